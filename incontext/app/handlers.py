"""The page's event handlers: turn gradio values into calls of :mod:`incontext.app.logic` and its answers into
component values, and turn every failure into a readable line in the page (never a stack trace).

Each handler returns a tuple whose last element is the status text (markdown); on failure the other outputs are
left unchanged (``gr.skip()``) and the status says what went wrong and how to fix it.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np

from incontext.app import logic
from incontext.app.config import AppConfig
from incontext.errors import InputError, WeightsNotFoundError

log = logging.getLogger("incontext.app")

MARK_MODES = ("Brush", "Clicks (SAM)", "Mask file")
CLICK_LABELS = ("object", "background")


def md_escape(text: str) -> str:
    """Escape markdown so paths and names with ``_``, ``*`` or ``<`` show as typed."""
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", str(text))


def ok(text: str) -> str:
    return f"**Done.** {text}"


def problem(text: str) -> str:
    return f"**Problem:** {md_escape(text)}"


def _user_error(err: BaseException) -> BaseException | None:
    """The error a user can act on behind ``err``: itself, or its cause when a wrapper (Hydra's instantiate)
    re-raised it."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, (InputError, WeightsNotFoundError)):
            return err
        err, seen = err.__cause__, seen + 1
    return None


def guarded(action: str, n_outputs: int, on_error: Callable[..., tuple] | None = None
            ) -> Callable[[Callable[..., tuple]], Callable[..., tuple]]:
    """Run a handler; on an exception report it in the status (the last output) and as a toast, and keep every
    other output unchanged (or set them to ``on_error(*args)``). Errors users can fix show their own message;
    anything else shows one line and goes to the server log with its traceback."""

    def wrap(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> tuple:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the page must get a sentence, the log gets the traceback
                user = _user_error(err)
                if user is not None:
                    msg = str(user)
                else:
                    log.exception("%s failed", action)
                    first = (str(err).strip().splitlines() or [""])[0][:300]
                    msg = (f"something went wrong while {action} ({type(err).__name__}: {first}); the server log "
                           "has the details")
            gr.Warning(msg, duration=8)
            rest = on_error(*args, **kwargs) if on_error else tuple(gr.skip() for _ in range(n_outputs - 1))
            return tuple(rest) + (problem(msg),)

        return run

    return wrap


class Handlers:
    """The callbacks of one app (shared by every page; per-page state lives in ``logic.Session``)."""

    def __init__(self, config: AppConfig, root: Path, methods: list[str],
                 models: logic.Models | None = None, clicker: logic.ClickSegmenter | None = None) -> None:
        self.config = config
        self.root = Path(root)
        self.methods = methods
        self.models = models or logic.Models(device=config.device)
        self.clicker = clicker or logic.ClickSegmenter(self._build_sam)
        self.banks = logic.Banks(device=config.device)

    def _build_sam(self) -> Any:
        from incontext.backbones import build_backbone

        return build_backbone(self.config.sam, device=self.config.device)

    # ------------------------------------------------------------------------------------------ helpers
    def _gallery(self, session: logic.Session) -> list[tuple[str, str]]:
        folder = session.folder(self.root) / "supports"
        folder.mkdir(exist_ok=True)
        items = []
        for i, s in enumerate(session.supports):
            path = logic.write_support_preview(s, folder / f"support_{i}_{logic.support_key('', [s])[:8]}.png")
            items.append((str(path), f"{i + 1}: {s.name} · {int((s.mask > 0).sum())} px"))
        return items

    def _supports_label(self, session: logic.Session) -> dict:
        return gr.update(value=self._gallery(session), label=f"Supports ({len(session.supports)})")

    def method_info(self, method: str) -> str:
        text = logic.method_summary(method)
        return md_escape(text) if text else ""

    # ------------------------------------------------------------------------------------------ support image
    @staticmethod
    def _forget_image(_self: Any, _path: Any, session: logic.Session) -> tuple:
        """A bad support upload: drop it and the image marked before, so what the page shows is what is used."""
        session.image, session.image_name, session.clicks, session.click_mask = None, None, [], None
        return session, None, None, None

    @guarded("reading the support image", 5, on_error=_forget_image)
    def load_support_image(self, path: str | None, session: logic.Session) -> tuple:
        """support file -> (session, editor, click view, support file, status)."""
        if path is None:
            return self._forget_image(self, path, session)[:4] + ("Support image cleared.",)
        image = logic.read_upload_image(path, what="support image", max_pixels=self.config.max_pixels)
        session.image, session.image_name = image, Path(path).name
        session.clicks, session.click_mask = [], None
        h, w = image.shape[:2]
        editor = {"background": image, "layers": [], "composite": None}
        return session, editor, image, gr.skip(), ok(
            f"Support image {md_escape(session.image_name)} ({w}×{h}) loaded. Mark the object — paint it, click "
            "on it, or upload its mask — then press **Add support**."
        )

    @staticmethod
    def mark_mode(mode: str) -> tuple:
        """mark mode -> visibility of (brush group, clicks group, mask-file group)."""
        return tuple(gr.update(visible=(mode == m)) for m in MARK_MODES)

    @guarded("turning the clicks into a mask", 3)
    def click(self, label: str, session: logic.Session, evt: gr.SelectData) -> tuple:
        """click on the support image -> (session, click view, status)."""
        if session.image is None:
            raise InputError("clicks: upload a support image first")
        x, y = (int(round(v)) for v in evt.index[:2])
        clicks = session.clicks + [(x, y, 1 if label == CLICK_LABELS[0] else 0)]
        t0 = time.perf_counter()
        mask = self.clicker.mask(session.image, clicks)
        seconds = time.perf_counter() - t0
        session.clicks, session.click_mask = clicks, mask.astype(np.uint8)
        view = logic.draw_clicks(session.image, session.click_mask, clicks,
                                 session.folder(self.root) / f"clicks_{len(clicks)}.png")
        sam = getattr(self.clicker.predictor, "name", self.config.sam)
        return session, str(view), ok(
            f"{len(clicks)} click(s): SAM ({md_escape(sam)}) outlined {int(mask.sum())} pixels in "
            f"{seconds * 1000:.0f} ms. Click more (choose *background* to remove a region) or **Add support**."
        )

    @guarded("clearing the clicks", 3)
    def clear_clicks(self, session: logic.Session) -> tuple:
        session.clicks, session.click_mask = [], None
        return session, session.image, "Clicks cleared."

    # ------------------------------------------------------------------------------------------ supports
    @guarded("adding the support", 3)
    def add_support(self, mode: str, editor: dict | None, mask_path: str | None, session: logic.Session) -> tuple:
        """(mark mode, editor value, mask file) -> (session, supports gallery, status)."""
        if session.image is None:
            raise InputError("support: upload a support image first, then mark the object on it")
        image = session.image
        if mode == MARK_MODES[0]:
            mask, how = logic.editor_mask(editor, image.shape[:2]), "brush"
        elif mode == MARK_MODES[1]:
            mask, how = session.click_mask, "clicks"
        else:
            mask, how = logic.read_upload_mask(mask_path, image, max_pixels=self.config.max_pixels), "mask file"
        name = f"support {len(session.supports) + 1} ({session.image_name})"
        support = logic.make_support(image, mask, name, how)
        session.supports.append(support)
        note = ""
        if session.concept is not None:
            note = f" The loaded concept {md_escape(session.concept_name)} is set aside: the supports define it now."
            session.concept, session.concept_name = None, None
        session.prepared = None
        return session, self._supports_label(session), ok(
            f"Added {md_escape(name)} ({int((support.mask > 0).sum())} object pixels, marked by {how}). "
            f"{len(session.supports)} support(s).{note} Add more, or upload queries and press **Segment**."
        )

    @guarded("removing the support", 3)
    def remove_last(self, session: logic.Session) -> tuple:
        if not session.supports:
            raise InputError("supports: there is none to remove")
        gone = session.supports.pop()
        session.prepared = None
        return session, self._supports_label(session), f"Removed {md_escape(gone.name)}."

    @guarded("clearing the supports", 3)
    def clear_supports(self, session: logic.Session) -> tuple:
        session.supports, session.prepared = [], None
        session.concept, session.concept_name = None, None
        return session, self._supports_label(session), "Supports and loaded concept cleared."

    # ------------------------------------------------------------------------------------------ concepts
    @guarded("loading the concept", 4)
    def load_concept(self, path: str | None, session: logic.Session) -> tuple:
        """concept file -> (session, supports gallery, method, status)."""
        if path is None:
            return session, gr.skip(), gr.skip(), ""
        ctx = logic.load_concept(path, self.methods)
        dropped = len(session.supports)
        session.concept, session.concept_name = ctx, Path(path).name
        session.supports, session.prepared = [], None
        shots = ctx.meta.get("shots", "?")
        note = f" Its supports replace the {dropped} support(s) you had added." if dropped else ""
        return session, self._supports_label(session), gr.update(value=ctx.method), ok(
            f"Loaded concept {md_escape(Path(path).name)} (method {md_escape(ctx.method)}, {shots} support(s), "
            f"classes {ctx.meta.get('classes')}).{note} Upload queries and press **Segment**."
        )

    def _context(self, method: str, session: logic.Session) -> tuple[Any, Any, Path | None, str]:
        """(model, context, concept file, what was done) for the page's supports or loaded concept."""
        if session.supports:
            model = self.models.get(method)
            key = logic.support_key(method, session.supports)
            if session.prepared is not None and session.prepared[0] == key:
                return model, session.prepared[1], session.prepared[2], "concept reused"
            ctx, path, seconds = logic.prepare_concept(model, session.supports, session.folder(self.root))
            session.prepared = (key, ctx, path)
            return model, ctx, path, f"concept prepared from {len(session.supports)} support(s) in {seconds:.2f} s"
        if session.concept is not None:
            ctx = session.concept
            if method != ctx.method:
                raise InputError(
                    f"method: the loaded concept {session.concept_name!r} was prepared by {ctx.method!r} but "
                    f"{method!r} is selected; choose {ctx.method!r}, or add supports to prepare a concept with "
                    f"{method!r}"
                )
            return self.models.get(ctx.method), ctx, None, f"loaded concept {session.concept_name}"
        raise InputError("concept: none yet; add a support (an image with the object marked) or load a saved "
                         "concept first")

    # ------------------------------------------------------------------------------------------ run
    @guarded("segmenting the queries", 5)
    def run(self, method: str, query_paths: list[str] | None, session: logic.Session,
            progress: gr.Progress = gr.Progress()) -> tuple:
        """(method, query files) -> (session, results gallery, results table, downloads, status)."""
        if not query_paths:
            raise InputError("queries: none uploaded; add one or more query images, then press Segment")
        queries, skipped = [], []
        for p in query_paths:
            try:
                image = logic.read_upload_image(p, what="query", max_pixels=self.config.max_pixels)
                queries.append((Path(p).name, image))
            except InputError as err:
                skipped.append(str(err))
        if not queries:
            raise InputError(" | ".join(skipped))
        t0 = time.perf_counter()
        progress(0.0, desc="Preparing the concept")
        with self.models.lock:
            model, ctx, concept_path, done = self._context(method, session)
            session.runs += 1
            out = session.folder(self.root) / f"run{session.runs}"

            def tick(i: int, n: int, name: str) -> None:
                progress((i, n), desc=f"Segmenting {name}" if name else "Done", unit="queries")

            results = logic.run_queries(model, ctx, queries, out, progress=tick)
        total = time.perf_counter() - t0
        gallery = gr.update(value=[(str(r.overlay_path), r.caption()) for r in results],
                            columns=max(1, min(len(results), 3)))
        table = [r.row() for r in results]
        files = [str(r.mask_path) for r in results] + ([str(concept_path)] if concept_path else [])
        found = sum(r.pixels > 0 for r in results)
        noun = "query" if len(results) == 1 else "queries"
        text = (f"{md_escape(ctx.method)}: object found in {found} of {len(results)} {noun} ({md_escape(done)}; "
                f"{total:.2f} s in all).")
        if skipped:
            text += " Skipped: " + " | ".join(md_escape(s) for s in skipped)
            return session, gallery, table, files, f"**Done, with problems.** {text}"
        return session, gallery, table, files, ok(text)

    # ------------------------------------------------------------------------------------------ prompt bank
    def _bank_query(self, folder: str, path: str | None) -> tuple[Any, np.ndarray]:
        retriever = self.banks.get(folder)
        return retriever, logic.read_upload_image(path, what="bank query", max_pixels=self.config.max_pixels)

    @guarded("searching the prompt bank", 4)
    def bank_search(self, folder: str, path: str | None, k: float, same_class: bool, session: logic.Session
                    ) -> tuple:
        """-> (session, hits gallery, hits table, status); the hits are kept for 'use as supports'."""
        retriever, image = self._bank_query(folder, path)
        t0 = time.perf_counter()
        hits = logic.bank_search(retriever, image, int(k), same_class=bool(same_class))
        seconds = time.perf_counter() - t0
        session.bank_hits = [h.support for h in hits]
        folder_out = session.folder(self.root) / "bank"
        folder_out.mkdir(exist_ok=True)
        gallery = []
        for i, h in enumerate(hits):
            name = f"hit_{i}_{logic.support_key('', [h.support])[:8]}.png"
            p = logic.write_support_preview(h.support, folder_out / name)
            gallery.append((str(p), f"{i + 1}: {h.cls} · {h.score:.3f}"))
        return session, gallery, [h.row(i + 1) for i, h in enumerate(hits)], ok(
            f"{len(hits)} example(s) from the bank in {seconds * 1000:.0f} ms. **Use these as supports** to segment "
            "with them."
        )

    @guarded("ranking the bank's concepts", 2)
    def bank_concepts(self, folder: str, path: str | None, top: float) -> tuple:
        retriever, image = self._bank_query(folder, path)
        rows = logic.bank_concepts(retriever, image, int(top))
        return rows, ok(f"The bank's {len(rows)} best-matching concept(s) for this image.")

    @guarded("using the bank's examples", 3)
    def use_bank_hits(self, session: logic.Session) -> tuple:
        if not session.bank_hits:
            raise InputError("bank: no examples yet; search the bank first")
        session.supports.extend(session.bank_hits)
        session.prepared = None
        session.concept, session.concept_name = None, None
        n = len(session.bank_hits)
        return session, self._supports_label(session), ok(f"Added {n} bank example(s) as supports.")
