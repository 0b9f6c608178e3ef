"""The trainer: schedule, step-indexed data, checkpoint layout/atomicity, exact resume after SIGKILL,
gradient accumulation and DDP equivalence. Everything runs a 2-layer painter on 32-px stand-in episodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from incontext.generate.painter_task import PainterTask
from incontext.train import checkpoint as ckpt
from incontext.train.data import EpisodeSource, StepBatchSampler, as_train_item
from incontext.train.logs import read_jsonl
from incontext.train.loop import TrainConfig, derive_seed, train
from incontext.train.optim import build_adamw, lr_at

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the stand-in data module (pytest runs with --import-mode=importlib)
import standin  # noqa: E402  tests/train/standin.py
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=[64, 32], patch_size=8,
            pretrain_image_size=32, merge_index=0, intermediate_hidden_state_indices=[0, 1],
            decoder_hidden_size=8, drop_path_rate=0.1)


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, warmup_steps=2, lr=1e-3, log_every=1, eval_every=3, save_every=3,
                progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]


# ------------------------------------------------------------------------------------------ pieces
def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 4, 20) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 20) == pytest.approx(1.0)
    assert lr_at(4, 1.0, 4, 20) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 4, 20) == pytest.approx(0.5)
    assert lr_at(20, 1.0, 4, 20, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(99, 1.0, 4, 20, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_step_indices_disjoint_across_ranks_and_equal_to_bigger_batch():
    one = StepBatchSampler(0, batch=4, accum=1, world=1)
    two = [StepBatchSampler(0, batch=2, accum=1, world=2, rank=r) for r in range(2)]
    acc = StepBatchSampler(0, batch=2, accum=2, world=1)
    for step in range(3):
        big = set(one.indices(step, 0))
        ranks = [set(s.indices(step, 0)) for s in two]
        assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] == big
        assert set(acc.indices(step, 0)) | set(acc.indices(step, 1)) == big
    resumed = list(StepBatchSampler(2, batch=4, max_steps=4))
    assert resumed == [one.indices(2, 0), one.indices(3, 0)]


def test_episode_source_wraps_sequences_with_seeded_permutations():
    seq = standin.held_out(5)
    src = EpisodeSource(seq, seed=3)
    first = [src[i].query.sum() for i in range(5)]
    assert sorted(first) == sorted(s.query.sum() for s in seq)  # each item once per pass
    again = EpisodeSource(seq, seed=3)
    assert [again[i].query.sum() for i in range(10)] == [src[i].query.sum() for i in range(10)]


def test_as_train_item_reads_benchmark_samples():
    from incontext.episode import Episode

    it = standin.RectEpisodes().episode(0)
    ep = Episode(it.query, [(s.image, s.mask) for s in it.supports])
    for x in [(ep, it.query_mask), {"episode": ep, "target": it.query_mask}]:
        got = as_train_item(x)
        assert np.array_equal(got.query_mask, it.query_mask) and len(got.supports) == 1
    with pytest.raises(TypeError, match="TrainItem"):
        as_train_item({"query": it.query})


def test_optimizer_state_roundtrip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_adamw(model, 1e-2, 0.05)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    def save_model(folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / "config.json").write_text("{}")
        save_file(model.state_dict(), str(folder / "model.safetensors"))

    ckpt.save_checkpoint(tmp_path, 2, save_model, opt, {"step": 2})
    opt2 = build_adamw(model, 1e-2, 0.05)
    state = ckpt.load_training_state(tmp_path / "last", opt2)
    assert state["step"] == 2
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(torch.as_tensor(a["state"][pid][k]), torch.as_tensor(b["state"][pid][k]))


def test_derive_seed_spreads():
    seeds = {derive_seed(0, s, 0, 0) for s in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    task = PainterTask(model=TINY, p_lower_half=0.5)
    summary = train(task, standin.RectEpisodes(), _cfg(), out, eval_data=standin.held_out(2),
                    evaluate_fn=standin.mean_iou)
    return out, summary


def test_run_writes_hf_layout_checkpoints_and_logs(short_run):
    out, summary = short_run
    root = out / "checkpoints"
    assert summary["step"] == 6 and np.isfinite(summary["last_loss"])
    assert os.readlink(root / "last") == "step-00000006"
    assert (root / "best").is_symlink()
    for name in ("config.json", "model.safetensors", ckpt.STATE_FILE, ckpt.TRAINER_FILE):
        assert (root / "last" / name).is_file(), name
    assert json.loads((root / "last" / "config.json").read_text())["model_type"] == "seggpt"
    state = json.loads((root / "last" / ckpt.TRAINER_FILE).read_text())
    assert state["step"] == 6 and state["layout"] == {"world": 1, "batch_size": 4, "grad_accum": 1}
    assert not list(root.glob(".tmp-*"))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
    assert (out / "train.csv").read_text().startswith("step,loss")
    assert "miou" in (out / "eval.csv").read_text()


def test_checkpoint_loads_as_the_painter_method(short_run):
    import incontext

    out, _ = short_run
    seg = incontext.build("painter", checkpoint=str(out / "checkpoints" / "last"))
    it = standin.held_out(1)[0]
    pred = seg.segment(it.query, [(s.image, s.mask) for s in it.supports])
    assert pred.mask.shape == it.query.shape[:2]


def test_refuses_to_overwrite_a_run_without_resume(short_run):
    out, _ = short_run
    with pytest.raises(FileExistsError, match="resume=true"):
        train(PainterTask(model=TINY), standin.RectEpisodes(), _cfg(), out)


def test_resume_in_process_matches_uninterrupted(short_run, tmp_path):
    """Stop after step 1 (time budget), resume to 6: same weights and losses as the 6-step run."""
    out, _ = short_run
    task = PainterTask(model=TINY, p_lower_half=0.5)
    # (max_steps would change the cosine schedule, so interrupt with the max_minutes budget instead)
    train(task, standin.RectEpisodes(), _cfg(max_minutes=1e-9), tmp_path, eval_data=standin.held_out(2),
          evaluate_fn=standin.mean_iou)
    assert json.loads((tmp_path / "checkpoints" / "last" / ckpt.TRAINER_FILE).read_text())["step"] == 1
    summary = train(task, standin.RectEpisodes(), _cfg(), tmp_path, resume=True,
                    eval_data=standin.held_out(2), evaluate_fn=standin.mean_iou)
    assert summary["step"] == 6
    a, b = _weights(out / "checkpoints" / "last"), _weights(tmp_path / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(out) == _losses(tmp_path)


def test_grad_accumulation_matches_bigger_batch(tmp_path):
    tiny = {**TINY, "drop_path_rate": 0.0}
    train(PainterTask(model=tiny), standin.RectEpisodes(), _cfg(max_steps=2, batch_size=4), tmp_path / "a")
    train(PainterTask(model=tiny), standin.RectEpisodes(), _cfg(max_steps=2, batch_size=2, grad_accum=2),
          tmp_path / "b")
    a, b = _weights(tmp_path / "a/checkpoints/last"), _weights(tmp_path / "b/checkpoints/last")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert np.allclose(_losses(tmp_path / "a"), _losses(tmp_path / "b"), atol=1e-5)


# ------------------------------------------------------------------------------------------ processes
def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), f"hydra.searchpath=[file://{HERE / 'hydra'}]",
            "experiment=standin", f"out_dir={out}", "train.threads=1", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """train.py killed with SIGKILL mid-run, then resume=true: final weights and the whole loss history equal
    an uninterrupted run's."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full), env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    kill_step = None
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(killed / "metrics.jsonl")
        if rows and rows[-1]["step"] >= 7:
            proc.send_signal(signal.SIGKILL)
            kill_step = rows[-1]["step"]
            break
        time.sleep(0.005)
    proc.wait()
    assert kill_step is not None and kill_step < 12, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    resumed_from = ckpt.find_resume(killed / "checkpoints")
    assert resumed_from is not None
    subprocess.run(_train_cmd(killed, "resume=true"), env=_env(), check=True, capture_output=True,
                   timeout=600)
    a, b = _weights(full / "checkpoints/last"), _weights(killed / "checkpoints/last")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(full) == _losses(killed) and len(_losses(full)) == 12
    evals = lambda run: [(r["step"], r["miou"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals(full) == evals(killed)


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes x batch 2 == 1 process x batch 4 (same items, averaged gradients);
    only rank 0 logs and saves."""
    pytest.importorskip("torch.distributed")
    common = ["train.max_steps=3", "train.eval_every=100", "train.save_every=100",
              "task.model.drop_path_rate=0.0"]
    subprocess.run(_train_cmd(tmp_path / "single", "train.batch_size=4", *common), env=_env(), check=True,
                   capture_output=True, timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run(torchrun + _train_cmd(tmp_path / "ddp", "train.batch_size=2", *common)[1:],
                         env=_env(), capture_output=True, timeout=600, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(tmp_path / "single/checkpoints/last"), _weights(tmp_path / "ddp/checkpoints/last")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    rows = read_jsonl(tmp_path / "ddp/metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]  # rank 0 only, no duplicates
    assert np.allclose(_losses(tmp_path / "single"), _losses(tmp_path / "ddp"), atol=1e-5)
    state = json.loads((tmp_path / "ddp/checkpoints/last" / ckpt.TRAINER_FILE).read_text())
    assert state["layout"]["world"] == 2


def test_class_subset_keeps_only_chosen_classes():
    from incontext.train.data import ClassSubset

    class Fake:
        class_ids = list(range(10))

        def episode_classes(self, i):
            return [(i * 7) % 10]

        def episode(self, i):
            return {"index": i, "classes": self.episode_classes(i)}

    sub = ClassSubset(Fake(), [2, 5], episodes=6)
    got = [sub[i]["classes"][0] for i in range(6)]
    assert set(got) == {2, 5} and len(sub) == 6
    assert [sub.episode(i)["index"] for i in range(3)] == [5, 6, 15]
    with pytest.raises(IndexError):
        sub[6]
    assert sub.episode(7)["classes"][0] in (2, 5)  # training streams index past len()
