"""The page's event handlers called directly (no browser): the flow of the page and its error lines."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the web app needs gradio: pip install -e '.[app]'")

from incontext.app import logic  # noqa: E402
from incontext.app.config import AppConfig  # noqa: E402
from incontext.app.handlers import MARK_MODES, Handlers, guarded, md_escape  # noqa: E402
from incontext.episode import Context  # noqa: E402
from incontext.errors import InputError  # noqa: E402
from incontext.io import read_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
SUPPORTS = [(DEMO / "supports" / f"support_{i}.png", DEMO / "supports" / f"support_{i}_mask.png") for i in (0, 1)]


@pytest.fixture(autouse=True)
def _quiet_toasts():
    # Outside a page gr.Warning becomes a Python warning; the status line is what these tests read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    return Handlers(AppConfig(method="prototype"), tmp_path_factory.mktemp("app"), ["prototype", "salient"])


def no_progress(*args, **kwargs):
    return None


def test_guarded_reports_user_errors_and_hides_internal_ones(caplog):
    @guarded("doing a thing", 3)
    def user_error():
        raise InputError("query 'x.txt': not a readable image")

    @guarded("doing a thing", 3)
    def bug():
        raise KeyError("inner_detail")

    out = user_error()
    assert len(out) == 3 and out[0] is not None and out[-1] == "**Problem:** query 'x.txt': not a readable image"
    assert all(isinstance(o, type(gr.skip())) for o in out[:2])
    with caplog.at_level("ERROR", logger="incontext.app"):
        status = bug()[-1]
    assert status.startswith(
        "**Problem:** something went wrong while doing a thing (KeyError: 'inner\\_detail'); the server log")
    assert "Traceback" not in status and "Traceback" in caplog.text  # the log keeps the traceback


def test_md_escape_keeps_names_readable():
    assert md_escape("my_file*2.png") == r"my\_file\*2.png"


def test_flow_mask_files_then_run_then_concept(handlers, tmp_path):
    session = logic.Session()
    for i, (img, msk) in enumerate(SUPPORTS):
        session, editor, view, _, status = handlers.load_support_image(str(img), session)
        assert status.startswith("**Done.**") and editor["background"].shape == (256, 256, 3)
        session, gallery, status = handlers.add_support(MARK_MODES[2], None, str(msk), session)
        assert f"{i + 1} support(s)" in status and len(gallery["value"]) == i + 1
    query = str(DEMO / "query.png")
    session, results, table, files, status = handlers.run("prototype", [query], session, progress=no_progress)
    assert status.startswith("**Done.** prototype: object found in 1 of 1 query"), status
    assert len(results["value"]) == 1 and table[0][0] == "query.png"
    mask_png, concept = Path(files[0]), Path(files[1])
    assert mask_png.name == "query_mask.png" and concept.suffix == ".safetensors"
    model = handlers.models.get("prototype")
    expected = model.segment(query, [tuple(map(str, p)) for p in SUPPORTS]).mask
    np.testing.assert_array_equal(read_mask(mask_png), expected)
    # A second run reuses the prepared concept.
    status = handlers.run("prototype", [query], session, progress=no_progress)[-1]
    assert "concept reused" in status
    # Reloading the downloaded concept on a fresh page gives the same mask.
    fresh = logic.Session()
    fresh, gallery, method, status = handlers.load_concept(str(concept), fresh)
    assert method["value"] == "prototype" and "Loaded concept" in status
    status = handlers.run("salient", [query], fresh, progress=no_progress)[-1]
    assert status.startswith("**Problem:** method: the loaded concept") and "choose 'prototype'" in status
    fresh, results, table, files, status = handlers.run("prototype", [query], fresh, progress=no_progress)
    np.testing.assert_array_equal(read_mask(files[0]), expected)
    assert len(files) == 1  # nothing new to download: the concept came from the user
    np.testing.assert_array_equal(model.segment(query, Context.load(concept)).mask, expected)


def test_bad_inputs_give_one_readable_line(handlers, tmp_path):
    session = logic.Session()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out = handlers.load_support_image(str(notes), session)
    assert out[-1].startswith("**Problem:** support image 'notes.txt'") and "not a readable image" in out[-1]
    assert out[1:4] == (None, None, None) and session.image is None  # the bad upload is dropped from the page
    assert "upload a support image first" in handlers.add_support(MARK_MODES[0], None, None, session)[-1]
    session = handlers.load_support_image(str(SUPPORTS[0][0]), session)[0]
    assert "nothing painted" in handlers.add_support(MARK_MODES[0], None, None, session)[-1]
    assert "click on the object" in handlers.add_support(MARK_MODES[1], None, None, session)[-1]
    empty = tmp_path / "empty.png"
    from PIL import Image

    Image.fromarray(np.zeros((256, 256), np.uint8)).save(empty)
    assert "the object mask is empty" in handlers.add_support(MARK_MODES[2], None, str(empty), session)[-1]
    assert "concept: none yet" in handlers.run("prototype", [str(DEMO / "query.png")], session,
                                               progress=no_progress)[-1]
    assert "queries: none uploaded" in handlers.run("prototype", [], session, progress=no_progress)[-1]
    # One bad query among good ones: the good ones run, the bad one is named.
    session = handlers.add_support(MARK_MODES[2], None, str(SUPPORTS[0][1]), session)[0]
    out = handlers.run("prototype", [str(DEMO / "query.png"), str(notes)], session, progress=no_progress)
    assert out[-1].startswith("**Done, with problems.**") and "query 'notes.txt'" in out[-1]
    assert len(out[1]["value"]) == 1


def test_clicks_use_the_configured_sam(tmp_path):
    h = Handlers(AppConfig(method="prototype", sam="sam_tiny"), tmp_path, ["prototype"])
    session = h.load_support_image(str(SUPPORTS[0][0]), logic.Session())[0]
    session, view, status = h.click("object", session, SimpleNamespace(index=[120, 80]))
    assert status.startswith("**Done.** 1 click(s): SAM (sam\\_tiny") and Path(view).is_file()
    assert h.clicker.predictor.name.startswith("sam_tiny")  # built from --sam on the first click
    assert session.click_mask.shape == (256, 256) and session.click_mask.dtype == np.uint8
    assert f"outlined {int(session.click_mask.sum())} pixels" in status
    session, view, status = h.click("background", session, SimpleNamespace(index=[10, 10]))
    assert session.clicks == [(120, 80, 1), (10, 10, 0)] and "2 click(s)" in status
    session, view, status = h.clear_clicks(session)
    assert session.clicks == [] and session.click_mask is None and view is session.image


def test_missing_sam_weights_are_reported_in_the_page(tmp_path):
    h = Handlers(AppConfig(sam="sam_vit_b"), tmp_path, ["prototype"])  # no released SAM file offline
    session = h.load_support_image(str(SUPPORTS[0][0]), logic.Session())[0]
    status = h.click("object", session, SimpleNamespace(index=[5, 5]))[-1]
    assert status.startswith("**Problem:**") and "sam\\_vit\\_b" in status and session.clicks == []


BANK = ROOT / "prompts_bank" / "synthetic-mini"


@pytest.mark.skipif(not (BANK / "BANK.json").is_file(), reason="the shipped demo bank is not in this checkout")
def test_bank_panel_search_concepts_and_use_as_supports(handlers, tmp_path):
    from PIL import Image

    retriever = handlers.banks.get(str(BANK))
    entry = retriever.bank.entry(int(retriever.bank.class_ids(retriever.bank.classes[3])[0]))
    query = tmp_path / "photo.png"
    Image.fromarray(retriever.bank.support(entry.id).image[::-1].copy()).save(query)
    session = logic.Session()
    assert "search the bank first" in handlers.use_bank_hits(session)[-1]
    # The shipped bank has 2 examples per class: with one class, 2 of the 3 asked for.
    session, gallery, table, status = handlers.bank_search(str(BANK), str(query), 3, True, session)
    assert status.startswith("**Done.** 2 example(s)") and len(gallery) == 2 and len(table) == 2
    assert len({row[1] for row in table}) == 1  # one class, as the retrieve stage gives a method
    rows, status = handlers.bank_concepts(str(BANK), str(query), 4)
    assert len(rows) == 4 and status.startswith("**Done.**")
    session, supports, status = handlers.use_bank_hits(session)
    assert len(session.supports) == 2 and "Added 2 bank example(s)" in status
    out = handlers.run("prototype", [str(query)], session, progress=no_progress)
    assert out[-1].startswith("**Done.** prototype: object found in") and "from 2 support(s)" in out[-1]
    assert "no prompt bank at" in handlers.bank_search(str(tmp_path), str(query), 3, True, session)[-1]
