"""The web app's logic (incontext.app.logic), without gradio or a browser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from incontext.app import logic
from incontext.episode import Context, Support
from incontext.errors import InputError
from incontext.io import read_image, read_mask

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
QUERY = DEMO / "query.png"
SUPPORTS = [(DEMO / "supports" / f"support_{i}.png", DEMO / "supports" / f"support_{i}_mask.png") for i in (0, 1)]


@pytest.fixture(scope="module")
def prototype():
    from incontext.registry import build

    return build("prototype")


# ------------------------------------------------------------------------------------------------ methods
def test_default_method_prefers_generalist_then_prototype():
    assert logic.default_method(["persam", "prototype", "generalist"]) == "generalist"
    assert logic.default_method(["persam", "prototype"]) == "prototype"
    assert logic.default_method(["zeta", "alpha"]) == "alpha"
    with pytest.raises(InputError, match="no method configs"):
        logic.default_method([])


def test_method_summary_reads_the_leading_comment_block(tmp_path):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "m.yaml").write_text("# First line.\n#   second_line\n\n# not this\n_target_: x\n")
    assert logic.method_summary("m", tmp_path) == "First line. second_line"
    assert logic.method_summary("missing", tmp_path) == ""
    assert "prototype" in logic.method_summary("prototype")  # the shipped config has a comment block


def test_models_builds_each_method_once():
    calls = []

    def builder(name, device):
        calls.append((name, device))
        return object()

    models = logic.Models(device="cpu", builder=builder)
    a, b = models.get("x"), models.get("x")
    assert a is b and calls == [("x", "cpu")]
    assert models.get("y") is not a and calls[-1] == ("y", "cpu")


# ------------------------------------------------------------------------------------------------ uploads
def test_read_upload_image_matches_read_image_and_names_the_file(tmp_path):
    got = logic.read_upload_image(str(QUERY), what="query", max_pixels=10**7)
    np.testing.assert_array_equal(got, read_image(QUERY))
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(InputError, match=r"query 'notes.txt'.*not a readable image.*text file"):
        logic.read_upload_image(str(notes), what="query", max_pixels=10**7)
    with pytest.raises(InputError, match="nothing uploaded"):
        logic.read_upload_image(None, what="query", max_pixels=10**7)
    with pytest.raises(InputError, match="upload it again"):
        logic.read_upload_image(str(tmp_path / "gone.png"), what="query", max_pixels=10**7)


def test_read_upload_image_refuses_too_many_pixels_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (4000, 3000)).save(bomb)  # 12 MP, a few kB on disk
    assert bomb.stat().st_size < 10_000
    with pytest.raises(InputError, match=r"bomb.png.*12,000,000 pixels.*--max-pixels"):
        logic.read_upload_image(str(bomb), what="support image", max_pixels=1_000_000)


def test_read_upload_mask_checks_size_against_the_image(tmp_path):
    image = read_image(SUPPORTS[0][0])
    mask = logic.read_upload_mask(str(SUPPORTS[0][1]), image, max_pixels=10**7)
    np.testing.assert_array_equal(mask, read_mask(SUPPORTS[0][1]))
    small = tmp_path / "small.png"
    Image.fromarray(np.pad(np.ones((10, 20), np.uint8) * 255, 5)).save(small)
    with pytest.raises(InputError, match=r"small.png.*30x20 pixels but the support image is 256x256"):
        logic.read_upload_mask(str(small), image, max_pixels=10**7)


def _rgba_layer(h, w, box):
    layer = np.zeros((h, w, 4), np.uint8)
    y0, y1, x0, x1 = box
    layer[y0:y1, x0:x1] = (255, 45, 85, 255)
    return layer


def test_editor_mask_is_the_painted_alpha_resized_to_the_image():
    value = {"background": np.zeros((40, 60, 4), np.uint8), "layers": [_rgba_layer(40, 60, (10, 20, 5, 15))],
             "composite": None}
    m = logic.editor_mask(value, (40, 60))
    assert m.dtype == np.uint8 and m.shape == (40, 60)
    assert m.sum() == 100 and m[10:20, 5:15].all()
    # A canvas at half the image's size: strokes scale with it (nearest neighbour keeps 0/1).
    m2 = logic.editor_mask(value, (80, 120))
    assert m2.shape == (80, 120) and set(np.unique(m2)) == {0, 1} and m2[20:40, 10:30].all() and m2.sum() == 400
    # Two layers: their union.
    value["layers"].append(_rgba_layer(40, 60, (30, 35, 50, 55)))
    assert logic.editor_mask(value, (40, 60)).sum() == 125


@pytest.mark.parametrize("value", [None, {"background": None, "layers": [], "composite": None},
                                   {"layers": [np.zeros((5, 5, 4), np.uint8)]}])
def test_editor_mask_without_strokes_says_what_to_do(value):
    with pytest.raises(InputError, match="nothing painted; paint over the object"):
        logic.editor_mask(value, (5, 5))


def test_make_support_empty_mask_message_names_the_tool():
    img = np.zeros((8, 8, 3), np.uint8)
    for how, fix in (("brush", "paint over"), ("clicks", "click on the object"), ("mask file", "non-zero")):
        with pytest.raises(InputError, match=f"the object mask is empty; .*{fix}"):
            logic.make_support(img, np.zeros((8, 8), np.uint8), "support 1", how)
    with pytest.raises(InputError, match="empty"):
        logic.make_support(img, None, "support 1", "clicks")
    s = logic.make_support(img, np.eye(8, dtype=np.uint8), "support 1", "brush")
    assert isinstance(s, Support) and s.classes == [1] and s.name == "support 1"


# ------------------------------------------------------------------------------------------------ clicks
class FakeSam:
    """Records what ClickSegmenter asks of a SAM predictor; masks are fixed rectangles with known IoU scores."""

    def __init__(self):
        self.embedded = 0
        self.calls = []
        self.current = None

    def embed(self, image):
        self.embedded += 1
        self.current = image.shape[:2]
        return ("embedding", image.shape[:2])

    def set_embedding(self, emb):
        self.current = emb[1]

    def decode(self, points, labels, multimask_output):
        from types import SimpleNamespace

        self.calls.append((points.copy(), labels.copy(), multimask_output))
        h, w = self.current
        n = 3 if multimask_output else 1
        masks = torch.zeros(1, n, h, w, dtype=torch.bool)
        for j in range(n):
            masks[0, j, : j + 1, : j + 1] = True  # mask j has (j + 1)^2 pixels
        iou = torch.tensor([[0.2, 0.9, 0.5][:n]])
        return SimpleNamespace(masks=masks, iou_pred=iou)


def test_click_segmenter_follows_sam_interactive_use():
    sam = FakeSam()
    clicker = logic.ClickSegmenter(lambda: sam)  # a factory: SAM loads on the first click
    img = np.zeros((30, 50, 3), np.uint8)
    m = clicker.mask(img, [(40, 10, 1)])
    # One click: three candidates, the best predicted IoU (index 1, 4 pixels) wins; points are (x, y).
    assert m.shape == (30, 50) and m.dtype == bool and m.sum() == 4
    pts, labels, multi = sam.calls[-1]
    assert multi is True and pts.tolist() == [[[40.0, 10.0]]] and labels.tolist() == [[1]]
    m = clicker.mask(img, [(40, 10, 1), (5, 25, 0)])
    pts, labels, multi = sam.calls[-1]
    assert multi is False and pts.shape == (1, 2, 2) and labels.tolist() == [[1, 0]] and m.sum() == 1
    assert sam.embedded == 1  # the image's encoding is reused across clicks
    clicker.mask(img + 1, [(1, 1, 1)])
    assert sam.embedded == 2


def test_click_segmenter_rejects_bad_clicks():
    clicker = logic.ClickSegmenter(FakeSam())
    img = np.zeros((30, 50, 3), np.uint8)
    with pytest.raises(InputError, match="none yet"):
        clicker.mask(img, [])
    with pytest.raises(InputError, match="outside the 50x30 image"):
        clicker.mask(img, [(50, 3, 1)])
    with pytest.raises(InputError, match="only background clicks"):
        clicker.mask(img, [(5, 3, 0)])


def test_click_segmenter_with_a_real_tiny_sam():
    from incontext.backbones import build_backbone

    clicker = logic.ClickSegmenter(build_backbone("sam_tiny"))
    img = read_image(QUERY)[:, :200]  # not square: SAM pads; the mask comes back at the image's size
    m = clicker.mask(img, [(100, 120, 1)])
    assert m.shape == img.shape[:2] and m.dtype == bool


# ------------------------------------------------------------------------------------------------ runs
def test_run_queries_matches_the_python_api_and_writes_results(tmp_path, prototype):
    supports = [Support(i, m) for i, m in SUPPORTS]
    ctx, concept_path, seconds = logic.prepare_concept(prototype, supports, tmp_path)
    assert concept_path == tmp_path / "concept_prototype.safetensors" and concept_path.is_file() and seconds > 0
    q = read_image(QUERY)
    ticks = []
    results = logic.run_queries(prototype, ctx, [("query.png", q), ("query.png", q[:, ::-1].copy())], tmp_path,
                                progress=lambda i, n, name: ticks.append((i, n, name)))
    assert ticks == [(0, 2, "query.png"), (1, 2, "query.png"), (2, 2, "")]
    expected = prototype.segment(str(QUERY), [tuple(map(str, p)) for p in SUPPORTS]).mask
    r0, r1 = results
    np.testing.assert_array_equal(r0.mask, expected)
    assert r0.pixels == int((expected > 0).sum()) > 0
    np.testing.assert_array_equal(read_mask(r0.mask_path), expected)  # the downloadable PNG holds the labels
    assert r0.overlay_path.is_file() and r0.mask_path != r1.mask_path  # same names do not overwrite each other
    assert 0.0 < r0.score <= 1.0 and r0.seconds > 0
    assert r0.caption().startswith("query.png · score ") and r0.row()[0] == "query.png"
    # The saved concept gives the same mask in the Python API.
    again = prototype.segment(str(QUERY), Context.load(concept_path)).mask
    np.testing.assert_array_equal(again, expected)


def test_score_is_none_when_nothing_is_found():
    from incontext.episode import Prediction

    empty = Prediction(mask=np.zeros((4, 4), np.uint8), scores={1: np.full((4, 4), 0.2, np.float32)})
    assert logic._score(empty) is None
    m = np.zeros((4, 4), np.uint8)
    m[:2] = 1
    prob = np.where(m > 0, 0.8, 0.1).astype(np.float32)
    assert logic._score(Prediction(mask=m, scores={1: prob})) == pytest.approx(0.8)


def test_prepare_without_supports_is_refused(tmp_path, prototype):
    with pytest.raises(InputError, match="supports: none yet"):
        logic.prepare_concept(prototype, [], tmp_path)


def test_load_concept_checks_file_and_method(tmp_path):
    good = Context("prototype", {"c1.x": torch.zeros(2)}, {"classes": [1]}).save(tmp_path / "c.safetensors")
    assert logic.load_concept(str(good), ["prototype"]).method == "prototype"
    with pytest.raises(InputError, match=r"method 'prototype', which this installation does not have"):
        logic.load_concept(str(good), ["persam"])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        logic.load_concept(str(junk), ["prototype"])
    with pytest.raises(InputError, match="nothing uploaded"):
        logic.load_concept(None, ["prototype"])


def test_session_folder_is_made_once_and_removed_on_close(tmp_path):
    s = logic.Session()
    folder = s.folder(tmp_path / "root")
    assert folder.is_dir() and folder.parent == tmp_path / "root" and s.folder(tmp_path / "root") == folder
    (folder / "x.png").write_bytes(b"x")
    s.close()
    assert not folder.exists() and s.workdir is None
    s.close()  # closing twice is harmless


def test_support_key_changes_with_method_pixels_and_mask():
    a = Support(np.zeros((6, 6, 3), np.uint8), np.eye(6, dtype=np.uint8))
    b = Support(np.zeros((6, 6, 3), np.uint8), np.eye(6, dtype=np.uint8)[::-1].copy())
    assert logic.support_key("m", [a]) == logic.support_key("m", [a])
    assert len({logic.support_key("m", [a]), logic.support_key("n", [a]), logic.support_key("m", [b]),
                logic.support_key("m", [a, b])}) == 4


def test_draw_clicks_marks_each_click(tmp_path):
    img = np.full((60, 80, 3), 100, np.uint8)
    path = logic.draw_clicks(img, None, [(10, 10, 1), (70, 50, 0)], tmp_path / "c.png")
    out = read_image(path)
    assert out.shape == img.shape
    assert out[10, 10, 1] > 150 and out[10, 10, 0] < 50     # green dot on the object click
    assert out[50, 70, 0] > 150 and out[50, 70, 1] < 80     # red dot on the background click
    assert (out[30, 40] == 100).all()                       # elsewhere the image is unchanged


# ------------------------------------------------------------------------------------------------ prompt bank
BANK = ROOT / "prompts_bank" / "synthetic-mini"


@pytest.mark.skipif(not (BANK / "BANK.json").is_file(), reason="the shipped demo bank is not in this checkout")
def test_bank_search_and_concepts_on_the_shipped_bank(tmp_path):
    banks = logic.Banks()
    retriever = banks.get(str(BANK))
    assert banks.get(str(BANK)) is retriever  # opened once
    entry = retriever.bank.entry(int(retriever.bank.class_ids(retriever.bank.classes[0])[0]))
    query = retriever.bank.support(entry.id).image[:, ::-1].copy()  # a mirrored bank image: not the entry itself
    hits = logic.bank_search(retriever, query, 2, same_class=True)
    assert len(hits) == 2 and len({h.cls for h in hits}) == 1
    assert hits[0].score >= hits[1].score
    assert all(isinstance(h.support, Support) and h.support.mask.any() for h in hits)
    assert hits[0].row(1)[:2] == [1, hits[0].cls]
    rows = logic.bank_concepts(retriever, query, 3)
    assert len(rows) == 3 and rows[0][1] >= rows[1][1] >= rows[2][1]
    with pytest.raises(InputError, match="no prompt bank at"):
        banks.get(str(tmp_path))
    with pytest.raises(InputError, match="bank folder: empty"):
        banks.get("  ")
