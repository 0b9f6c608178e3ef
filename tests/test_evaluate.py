"""The evaluation command end to end on a few small episodes, and the shuffled-support control."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from incontext.data.synthetic import SyntheticBenchmark
from incontext.evaluate import evaluate, run
from incontext.registry import build

REPO = Path(__file__).resolve().parent.parent


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_evaluate_writes_json_and_markdown_and_is_deterministic(tmp_path):
    args = ["benchmark=synthetic", "benchmark.size=64", "method=prototype", "method.match.features.size=64",
            "shots=1", "episodes=3", "seed=1", "progress=false"]
    r1 = run(_cfg(*args, f"out={tmp_path / 'a.json'}"))
    r2 = run(_cfg(*args, f"out={tmp_path / 'b.json'}"))
    data = json.loads((tmp_path / "a.json").read_text())
    for key in ("miou", "fbiou", "sec_per_episode", "peak_rss_mb", "config", "per_class", "boundary_iou"):
        assert key in data
    assert 0.0 <= data["miou"] <= 100.0 and 0.0 <= data["fbiou"] <= 100.0
    assert data["episodes"] == 3 and data["config"]["benchmark"]["size"] == 64
    assert data["config"]["method"]["_target_"] and data["metric_resolution"] == "query original size"
    assert r1["miou"] == r2["miou"] and r1["episode_iou"] == r2["episode_iou"]
    md = (tmp_path / "a.md").read_text()
    assert "| synthetic | prototype | 1 | matched | 3 |" in md


def test_shuffled_supports_control_on_a_small_run():
    method = build("prototype", ["match.features.size=96"])  # smaller features: a fast small run
    kw = dict(size=96, shots=1, episodes=12, seed=0)
    matched = evaluate(method, SyntheticBenchmark(supports="matched", **kw), progress=False)
    shuffled = evaluate(method, SyntheticBenchmark(supports="shuffled", **kw), progress=False)
    assert shuffled["miou"] < matched["miou"]


def test_support_free_controls_run():
    bench = SyntheticBenchmark(size=64, episodes=2, seed=0)
    for name in ("salient", "centre_prior"):
        r = evaluate(build(name), bench, progress=False)
        assert r["episodes"] == 2 and 0.0 <= r["miou"] <= 100.0


def test_cli_runs(tmp_path):
    out = tmp_path / "r.json"
    ok = subprocess.run([sys.executable, "-m", "incontext.evaluate", "benchmark.size=48", "episodes=2",
                         "method.match.features.size=48", "progress=false", f"out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "mIoU" in ok.stdout and out.is_file() and out.with_suffix(".md").is_file()


def test_bad_input_is_one_line(tmp_path, capsys):
    from incontext.evaluate import run_cli

    code = run_cli(_cfg("benchmark=folder", f"benchmark.root={tmp_path / 'missing'}", f"out={tmp_path / 'x.json'}"))
    err = capsys.readouterr().err
    assert code == 2 and "benchmark.root" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("out", ["result.txt"])
def test_out_must_be_json(tmp_path, out):
    from incontext.errors import InputError

    with pytest.raises(InputError, match="out"):
        run(_cfg("benchmark.size=48", "episodes=1", "progress=false", f"out={tmp_path / out}"))
