"""infer.py end to end in a subprocess: one good run, bad inputs with one-line errors and no output left."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO, disc_image


def run_infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def write_pair(folder: Path, stem: str, seed: int, cx: float) -> tuple[Path, Path]:
    img, mask = disc_image(cx=cx, seed=seed)
    Image.fromarray(img).save(folder / f"{stem}.jpg", quality=95)
    Image.fromarray(mask * 255).save(folder / f"{stem}.png")
    return folder / f"{stem}.jpg", folder / f"{stem}.png"


def test_infer_writes_mask_overlay_json(tmp_path):
    s_img, s_mask = write_pair(tmp_path, "support", 1, 0.6)
    q_img, q_mask = write_pair(tmp_path, "query", 2, 0.3)
    out = tmp_path / "out"
    r = run_infer(f"query={q_img}", f"supports=[{s_img}:{s_mask}]", f"output_dir={out}",
                  f"save_context={tmp_path / 'ctx.safetensors'}")
    assert r.returncode == 0, r.stderr
    mask = np.array(Image.open(out / "query_mask.png"))
    assert mask.shape == (96, 128)
    gt = np.array(Image.open(q_mask)) > 0
    inter = ((mask > 0) & gt).sum()
    assert inter / ((mask > 0) | gt).sum() > 0.6
    assert (out / "query_overlay.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "prototype"
    # the saved concept gives the same mask in a fresh process
    out2 = tmp_path / "out2"
    r2 = run_infer(f"query={q_img}", f"context={tmp_path / 'ctx.safetensors'}", f"output_dir={out2}")
    assert r2.returncode == 0, r2.stderr
    assert np.array_equal(np.array(Image.open(out2 / "query_mask.png")), mask)


def test_infer_bad_input_one_line_and_nothing_written(tmp_path):
    s_img, _ = write_pair(tmp_path, "support", 1, 0.6)
    q_img, _ = write_pair(tmp_path, "query", 2, 0.3)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(empty)
    out = tmp_path / "out"
    r = run_infer(f"query={q_img}", f"supports=[{s_img}:{empty}]", f"output_dir={out}")
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "empty" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_infer_missing_query_names_argument(tmp_path):
    r = run_infer(f"query={tmp_path / 'nope.jpg'}", f"output_dir={tmp_path / 'o'}")
    assert r.returncode != 0 and "query" in r.stderr and "Traceback" not in r.stderr


def test_infer_with_bank_and_no_supports_retrieves(tmp_path):
    out = tmp_path / "out"
    r = run_infer(f"query={REPO / 'examples/demo/query.png'}", f"bank={REPO / 'prompts_bank/synthetic-mini'}",
                  "shots=2", f"output_dir={out}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "query.json").read_text())
    assert len(summary["extras"]["retrieved_supports"]) == 2
    assert np.array(Image.open(out / "query_mask.png")).shape == (256, 256)
