"""The web app in a real headless browser (Debian's chromium driven by playwright).

Starts ``python -m incontext.app`` on a free local port, uploads the demo episode, segments, and checks the mask the
page offers for download against the Python API; reloads the downloaded concept; drives the brush, the clicks and
bad uploads. Skips only when playwright or a chromium binary is missing (``apt-get install -y chromium``;
``INCONTEXT_CHROMIUM=/path`` points at another binary).

The page's screenshot is written to the test's tmp folder; ``INCONTEXT_APP_SCREENSHOT=1`` also writes it to
``docs/app_screenshot.png`` (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the web app needs gradio: pip install -e '.[app]'")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the browser test needs playwright: pip install playwright")

from incontext.episode import Context  # noqa: E402
from incontext.io import read_image, read_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
QUERY = DEMO / "query.png"
SUPPORTS = [(DEMO / "supports" / f"support_{i}.png", DEMO / "supports" / f"support_{i}_mask.png") for i in (0, 1)]
METHOD = "prototype"  # fast and deterministic; the default (generalist when installed) is chosen the same way
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_S = 180  # the machine is shared: importing torch + gradio can take a while
STEP_MS = int(os.environ.get("INCONTEXT_BROWSER_STEP_MS", 90_000))


def find_chromium() -> str | None:
    env = os.environ.get("INCONTEXT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """Serve the app in a subprocess, as a user starts it; yield its URL."""
    tmp = tmp_path_factory.mktemp("app_server")
    port = free_port()
    log_path = tmp / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "incontext.app", "--port", str(port), "--method", METHOD, "--sam", "sam_tiny",
           "--max-file-size", "2mb", "--workdir", str(tmp / "work")]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} within {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Every problem these tests cause is one a user can fix: none may reach the server log as a traceback.
        server_log = log_path.read_text(errors="replace")
        assert "Traceback" not in server_log, server_log[-3000:]


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium binary found (PATH, /usr/bin/chromium, $INCONTEXT_CHROMIUM); install it with "
                    "`apt-get install -y chromium`")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def expected_mask():
    """The Python API's answer for the demo episode (computed while the server starts)."""
    from incontext.registry import build

    return build(METHOD).segment(str(QUERY), [tuple(map(str, p)) for p in SUPPORTS]).mask


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(STEP_MS)
    page.goto(url)
    page.wait_for_selector("#support-file input[type=file]", state="attached")
    return page


def status_contains(page, text: str) -> None:
    sync_api.expect(page.locator("#status")).to_contain_text(text, timeout=STEP_MS)


def upload(page, elem_id: str, files, wait: bool = False) -> None:
    """Upload into a file box, first clearing what it shows (a filled box has no file input). ``wait``: until
    the server holds every file (the box shows the names before the upload ends; a click then would race it)."""
    clear = page.locator(f"#{elem_id} button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator(f"#{elem_id} input[type=file]").set_input_files(files)
    if wait:
        n = len(files) if isinstance(files, list) else 1
        sync_api.expect(page.locator(f"#{elem_id} a[href*='file=']")).to_have_count(n, timeout=STEP_MS)


def downloads(page) -> dict[str, bytes]:
    """The files the page offers in its downloads box: name -> bytes (fetched as the browser would)."""
    out = {}
    for link in page.locator("#downloads a").all():
        href = link.get_attribute("href")
        if href:
            out[href.rsplit("/", 1)[-1]] = page.request.get(href).body()
    return out


def as_mask(data: bytes, tmp: Path, name: str) -> np.ndarray:
    path = tmp / name
    path.write_bytes(data)
    return read_mask(path)


def test_demo_episode_in_the_browser_matches_the_python_api(browser, app_url, expected_mask, tmp_path):
    page = open_page(browser, app_url)
    page.get_by_label("Mask file").check()
    for i, (img, msk) in enumerate(SUPPORTS):
        upload(page, "support-file", str(img))
        status_contains(page, f"Support image {img.name}")
        upload(page, "mask-file", str(msk), wait=True)
        page.click("#add-support")
        status_contains(page, f"{i + 1} support(s)")
    assert page.locator("#supports img").count() == 2
    upload(page, "queries", [str(QUERY)], wait=True)
    page.click("#run")
    status_contains(page, f"{METHOD}: object found in 1 of 1 query")
    # An overlay appears, at the query's size, with its caption, and the table row.
    overlay = page.locator("#results img").first
    overlay.wait_for()
    shown = read_image(page.request.get(overlay.get_attribute("src")).body())
    assert shown.shape == read_image(QUERY).shape
    assert "query.png" in page.inner_text("#results-table")
    assert "query.png · score " in page.inner_text("#results")  # the overlay's caption: score, area, time
    files = downloads(page)
    assert set(files) == {"query_mask.png", f"concept_{METHOD}.safetensors"}, files.keys()
    got = as_mask(files["query_mask.png"], tmp_path, "query_mask.png")
    inter = np.logical_and(got > 0, expected_mask > 0).sum()
    union = np.logical_or(got > 0, expected_mask > 0).sum()
    assert (got == expected_mask).all(), f"page and API masks differ (foreground IoU {inter / max(union, 1):.4f})"
    assert "Traceback" not in page.inner_text("body")

    shot = tmp_path / "app_screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("INCONTEXT_APP_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "app_screenshot.png")

    # The downloaded concept loads in the Python API and gives the same mask ...
    concept = tmp_path / f"concept_{METHOD}.safetensors"
    concept.write_bytes(files[concept.name])
    ctx = Context.load(concept)
    from incontext.registry import build

    assert (build(ctx.method).segment(str(QUERY), ctx).mask == expected_mask).all()
    # ... and reloaded into the page (supports cleared) it gives the same mask there too.
    page.click("#clear-supports")
    status_contains(page, "Supports and loaded concept cleared")
    upload(page, "concept-in", str(concept))
    status_contains(page, f"Loaded concept {concept.name}")
    page.click("#run")
    status_contains(page, f"loaded concept {concept.name}")
    files = downloads(page)
    assert set(files) == {"query_mask.png"}
    assert (as_mask(files["query_mask.png"], tmp_path, "again.png") == expected_mask).all()
    page.close()


def test_brush_clicks_and_bad_uploads_in_the_browser(browser, app_url, tmp_path):
    from PIL import Image

    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a photo\n")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (6000, 5000)).save(bomb)  # 30 MP in a few kB: above the app's 20 MP limit
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(3 * 1024 * 1024))  # above this server's --max-file-size 2mb

    page = open_page(browser, app_url)
    # Bad uploads: one readable line each, in the page, no stack trace.
    upload(page, "support-file", str(notes))
    status_contains(page, "support image 'notes.txt'")
    status_contains(page, "not a readable image (it looks like a text file)")
    upload(page, "support-file", str(bomb))
    status_contains(page, "30,000,000 pixels, above the limit")

    # The brush: an empty canvas is refused, a stroke in the upper left becomes the support's mask.
    img_path = SUPPORTS[0][0]
    upload(page, "support-file", str(img_path))
    status_contains(page, f"Support image {img_path.name}")
    page.click("#add-support")
    status_contains(page, "nothing painted")
    page.wait_for_timeout(500)
    canvas = page.locator("#editor canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 90, cy - 40)
    page.mouse.down()
    page.mouse.move(cx - 60, cy - 30, steps=3)  # each event repaints the canvas in software GL: keep them few
    page.mouse.up()
    page.click("#add-support")
    status_contains(page, "marked by brush")
    preview = page.locator("#supports img").first
    preview.wait_for()
    tinted = read_image(page.request.get(preview.get_attribute("src")).body()).astype(int)
    painted = np.abs(tinted - read_image(img_path).astype(int)).sum(axis=2) > 30
    ys, xs = np.nonzero(painted)
    h, w = painted.shape
    # The stroke was drawn left of and above the canvas centre, more to the left than up.
    centre = (xs.mean(), ys.mean())
    assert painted.sum() > 100 and centre[0] < w / 2 - 30 and h / 2 - 60 < centre[1] < h / 2 - 10, centre

    # Clicks: SAM (the tiny random one this server was started with) answers a click on the image.
    page.get_by_label("Clicks (SAM)").check()
    view = page.locator("#click-view img").first
    view.wait_for()
    vb = view.bounding_box()
    view.click(position={"x": vb["width"] * 0.7, "y": vb["height"] * 0.4})  # scrolls it into view first
    status_contains(page, "1 click(s): SAM (sam_tiny")

    # A query that is not an image, with a concept from the brushed support.
    upload(page, "queries", [str(notes)], wait=True)
    page.click("#run")
    status_contains(page, "query 'notes.txt'")

    # A file above the server's upload limit is refused by the page with a message.
    upload(page, "support-file", str(big))
    sync_api.expect(page.get_by_text("exceed the maximum allowed size").first).to_be_visible(timeout=STEP_MS)
    assert "Traceback" not in page.inner_text("body")
    page.close()
