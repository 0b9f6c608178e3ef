"""The page layout and its wiring to :class:`incontext.app.handlers.Handlers`.

Left column: show the object (support image + brush / clicks / mask file, the supports, reload a concept).
Right column: find it (queries, Segment, overlays with scores and timing, downloads). Below: the prompt bank.
Element ids (``elem_id``) are stable: the browser test finds components by them.
"""

from __future__ import annotations

import gradio as gr

from incontext.app import logic
from incontext.app.handlers import CLICK_LABELS, MARK_MODES, Handlers

INTRO = """# incontext · one-shot personalisation
Mark an object once, find it in your other photos, and take the result (masks, or the saved *concept*) into your
app. Everything runs on this machine."""

CSS = """
#status { min-height: 2.5em; }
#status p { margin: 0.2em 0; }
footer { display: none !important; }
"""


def build_blocks(h: Handlers, default_method: str) -> gr.Blocks:
    """The page (a ``gr.Blocks``) with every event wired to ``h``."""
    # Uploads and served copies older than a day are dropped hourly; a closed page's own folder at once.
    with gr.Blocks(title="incontext · one-shot personalisation", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:
        session = gr.State(logic.Session(), delete_callback=logic.Session.close)
        gr.Markdown(INTRO)
        with gr.Row():
            method = gr.Dropdown(h.methods, value=default_method, label="Method / preset", elem_id="method",
                                 scale=1)
            method_info = gr.Markdown(h.method_info(default_method), elem_id="method-info")
        status = gr.Markdown("Upload a support image to start.", elem_id="status")

        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown("### 1 · Show the object")
                support_file = gr.File(label="Support image", elem_id="support-file", height=90)
                mode = gr.Radio(list(MARK_MODES), value=MARK_MODES[0], label="Mark the object by",
                                elem_id="mark-mode")
                with gr.Group(visible=True) as brush_group:
                    editor = gr.ImageEditor(
                        label="Paint over the object", type="numpy", image_mode="RGBA", sources=[],
                        brush=gr.Brush(colors=["#ff2d55"], color_mode="fixed"), layers=False, transforms=[],
                        elem_id="editor", height=360,
                    )
                with gr.Group(visible=False) as click_group:
                    click_label = gr.Radio(list(CLICK_LABELS), value=CLICK_LABELS[0], label="A click marks",
                                           elem_id="click-label")
                    click_view = gr.Image(label="Click on the object (SAM outlines it)", interactive=False,
                                          elem_id="click-view", height=360)
                    clear_clicks = gr.Button("Clear clicks", size="sm", elem_id="clear-clicks")
                with gr.Group(visible=False) as mask_group:
                    mask_file = gr.File(label="Mask PNG for this image (0 = background)", elem_id="mask-file",
                                        height=90)
                add = gr.Button("Add support", variant="primary", elem_id="add-support")
                supports = gr.Gallery(label="Supports (0)", columns=4, fit_columns=False, height=230,
                                      elem_id="supports", preview=False, object_fit="contain")
                with gr.Row():
                    remove_last = gr.Button("Remove last", size="sm", elem_id="remove-last")
                    clear_supports = gr.Button("Clear all", size="sm", elem_id="clear-supports")
                concept_in = gr.File(label="…or reload a saved concept (.safetensors)", elem_id="concept-in",
                                     height=130)

            with gr.Column(scale=1):
                gr.Markdown("### 2 · Find it")
                queries = gr.File(label="Query images (one or many)", file_count="multiple", elem_id="queries",
                                  height=90)
                run = gr.Button("Segment", variant="primary", elem_id="run")
                results = gr.Gallery(label="Results: overlays with score and time", columns=2, height="auto",
                                     elem_id="results", object_fit="contain", preview=False)
                table = gr.Dataframe(headers=logic.RESULT_HEADERS, label="Per query", interactive=False,
                                     elem_id="results-table", wrap=True)
                downloads = gr.File(label="Download masks (PNG) and the concept (.safetensors)",
                                    file_count="multiple", interactive=False, elem_id="downloads")

        with gr.Accordion("Prompt bank: find examples of what is in a photo", open=False, elem_id="bank"):
            with gr.Row():
                bank_dir = gr.Textbox(h.config.default_bank(), label="Bank folder", elem_id="bank-dir", scale=3)
                bank_k = gr.Slider(1, 10, value=3, step=1, label="Examples", elem_id="bank-k", scale=1)
                same_class = gr.Checkbox(True, label="One class (what the retrieve stage uses)",
                                         elem_id="bank-same-class", scale=1)
            bank_query = gr.File(label="Photo to search with", elem_id="bank-query", height=90)
            with gr.Row():
                search = gr.Button("Search examples", elem_id="bank-search")
                concepts = gr.Button("Which concepts are in it?", elem_id="bank-concepts")
                use_hits = gr.Button("Use these as supports", elem_id="bank-use")
            hits = gr.Gallery(label="Examples", columns=5, fit_columns=False, height="auto", elem_id="bank-hits",
                              object_fit="contain", preview=False)
            hits_table = gr.Dataframe(headers=logic.BANK_HEADERS, label="Examples found", interactive=False,
                                      elem_id="bank-table")
            concepts_table = gr.Dataframe(headers=logic.CONCEPT_HEADERS, label="The bank's concepts in the photo",
                                          interactive=False, elem_id="bank-concepts-table")

        # ---- wiring
        method.change(h.method_info, method, method_info, show_progress="hidden")
        for event in (support_file.upload, support_file.clear):
            event(h.load_support_image, [support_file, session], [session, editor, click_view, support_file, status])
        mode.change(Handlers.mark_mode, mode, [brush_group, click_group, mask_group], show_progress="hidden")
        click_view.select(h.click, [click_label, session], [session, click_view, status])
        clear_clicks.click(h.clear_clicks, session, [session, click_view, status])
        add.click(h.add_support, [mode, editor, mask_file, session], [session, supports, status])
        remove_last.click(h.remove_last, session, [session, supports, status])
        clear_supports.click(h.clear_supports, session, [session, supports, status])
        concept_in.upload(h.load_concept, [concept_in, session], [session, supports, method, status])
        run.click(h.run, [method, queries, session], [session, results, table, downloads, status])
        search.click(h.bank_search, [bank_dir, bank_query, bank_k, same_class, session],
                     [session, hits, hits_table, status])
        concepts.click(h.bank_concepts, [bank_dir, bank_query, bank_k], [concepts_table, status])
        use_hits.click(h.use_bank_hits, session, [session, supports, status])
    return demo
