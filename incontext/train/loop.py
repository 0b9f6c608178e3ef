"""The episodic training loop shared by every trainable stage (``train.py`` is its Hydra front end).

Per step: set the scheduled learning rate, run ``grad_accum`` micro-batches (DDP syncs on the last one only),
unscale + clip the gradient, one AdamW update; log; evaluate on held-out episodes every ``eval_every`` steps
with ``incontext.evaluate``; checkpoint every ``save_every`` steps, on a new best, at the end, and when the
``max_minutes`` budget runs out.

Exact resume: all randomness is a function of (seed, step, micro-step, rank, item index) — items through
``incontext.train.data``, torch's global generator (dropout, drop-path) reseeded before every micro-batch —
the schedule is a function of the step, and weights + AdamW moments are restored bit for bit. So a run killed at
any moment and resumed from its last checkpoint reproduces the uninterrupted run's weights and losses exactly
(same device, thread count and world size).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from incontext.train import checkpoint as ckpt
from incontext.train import distributed as dist_utils
from incontext.train.data import EpisodeSource, IndexedSamples, StepBatchSampler, as_source, stack
from incontext.train.logs import MetricsLog
from incontext.train.optim import build_adamw, lr_at, set_lr

__all__ = ["TrainConfig", "train", "derive_seed", "resolve_amp"]


@dataclass
class TrainConfig:
    """Settings of ``configs/train/*.yaml`` (see ``configs/train/default.yaml`` for each one's meaning)."""

    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0
    amp: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 200
    eval_at_start: bool = False
    save_every: int = 200
    keep_last: int = 2
    best_metric: str = "miou"
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = True
    find_unused_parameters: bool = True
    progress: bool = True
    tensorboard: Any = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train: unknown setting(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (SeedSequence mixing, so neighbouring steps get unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` ("auto" | "off" | "bf16" | "fp16") on ``device``; None = float32.

    "auto" uses bf16 on CUDA devices that support it, fp16 on older CUDA devices and float32 on CPU (CPU
    autocast is slower than float32 for these models on the machines we measured)."""
    amp = str(amp).lower()
    if amp in ("off", "false", "none", "fp32"):
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or off on CPU")
        return torch.float16
    raise ValueError(f"train.amp: {amp!r} is not one of auto, off, bf16, fp16")


def _budget_done(start: float, elapsed_before: float, max_minutes: float | None) -> bool:
    return max_minutes is not None and (elapsed_before + time.perf_counter() - start) >= 60.0 * max_minutes


def train(
    task: Any,
    train_data: Any,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    eval_data: Any = None,
    evaluate_fn: Callable[..., dict[str, float]] | None = None,
    run_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``task`` on ``train_data``.

    Args:
        task: a ``TrainTask`` (``incontext.train.task``).
        train_data: episode dataset (callable index -> item, ``.episode(index)``, or a sequence); see
            ``incontext.train.data.EpisodeSource``.
        cfg: loop settings.
        out_dir: run folder: ``checkpoints/``, ``metrics.jsonl``, ``train.csv``, ``eval.csv``.
        resume: continue from ``out_dir/checkpoints`` (last complete checkpoint) if there is one.
        eval_data: held-out episodes passed to ``evaluate_fn``; None disables evaluation.
        evaluate_fn: ``f(segmenter, eval_data) -> {metric: value}`` (``incontext.evaluate``).
        run_config: the full resolved config, saved beside the checkpoints for reproduction.

    Returns:
        Summary: final step, last train loss, best metric, paths.
    """
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    info, device = dist_utils.setup(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ckpt_root = out_dir / "checkpoints"

    torch.manual_seed(derive_seed(cfg.seed, 0xB1D))  # same init on every rank; DDP also broadcasts it
    model = task.build_model().to(device)
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay, cfg.betas)

    start_step, elapsed_before = 0, 0.0
    best = {"metric": cfg.best_metric, "value": None, "step": None}
    resume_from = ckpt.find_resume(ckpt_root) if resume else None
    if resume_from is not None:
        ckpt.load_weights(resume_from, model)
        state = ckpt.load_training_state(resume_from, optimizer, scaler)
        start_step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        best = state.get("best", best)
        prev = state.get("layout", {})
        now = {"world": info.world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
        if prev and prev != now and info.is_main:
            print(f"warning: resuming with {now} but the run started with {prev}; the data order changes")
    elif not resume and info.is_main and ckpt.find_resume(ckpt_root) is not None:
        raise FileExistsError(
            f"{ckpt_root} already holds checkpoints; pass resume=true to continue that run, or choose another "
            "out_dir"
        )
    log = MetricsLog(out_dir, start_step if resume_from is not None else None, cfg.tensorboard, info.is_main)
    if info.is_main and run_config is not None:
        ckpt.write_text_atomic(out_dir / "run_config.json", json.dumps(run_config, indent=2, default=str))

    ddp_model = dist_utils.wrap(model, info, device, cfg.find_unused_parameters)
    source: EpisodeSource = as_source(train_data, cfg.seed)
    samples = IndexedSamples(source, task.make_sample, cfg.seed)
    sampler = StepBatchSampler(start_step, cfg.batch_size, cfg.grad_accum, info.world, info.rank, cfg.max_steps)
    loader = torch.utils.data.DataLoader(
        samples, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=stack,
        persistent_workers=cfg.num_workers > 0,
    )
    batches = iter(loader)
    params = [p for p in model.parameters() if p.requires_grad]

    bar = None
    if cfg.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def run_eval(at_step: int) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = evaluate_fn(task.segmenter(model, device), eval_data)
        model.train()
        log.log("eval", at_step, {k: float(v) for k, v in metrics.items()
                                  if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)})
        return metrics

    if cfg.eval_at_start and start_step == 0 and eval_data is not None and evaluate_fn is not None:
        if info.is_main:
            run_eval(0)  # the untrained baseline of the curve
        dist_utils.barrier(info)

    t_start = time.perf_counter()
    t_window, n_window, loss_window = time.perf_counter(), 0, []
    step = start_step
    last_loss = float("nan")
    stop = False
    while step < cfg.max_steps and not stop:
        ddp_model.train()
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            torch.manual_seed(derive_seed(cfg.seed, step, micro, info.rank))
            sync = micro == cfg.grad_accum - 1 or not info.enabled
            ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
            amp_ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                with amp_ctx:
                    loss, extra_logs = task.loss(ddp_model, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        scaler.unscale_(optimizer)
        if cfg.clip_grad:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        else:
            gnorm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_window += cfg.batch_size * cfg.grad_accum * info.world

        vals = dist_utils.all_reduce_mean({"loss": total, **extra_logs}, info, device)
        last_loss = vals["loss"]
        loss_window.append(last_loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - t_window
            log.log("train", step, {**vals, "loss_avg": float(np.mean(loss_window)), "lr": lr,
                                    "grad_norm": gnorm, "episodes_per_s": n_window / max(dt, 1e-9),
                                    "elapsed_s": elapsed_before + time.perf_counter() - t_start})
            t_window, n_window, loss_window = time.perf_counter(), 0, []

        stop = dist_utils.any_rank(_budget_done(t_start, elapsed_before, cfg.max_minutes), info, device)
        is_last = step >= cfg.max_steps or stop
        is_best = False
        if eval_data is not None and evaluate_fn is not None and (step % cfg.eval_every == 0 or is_last):
            if info.is_main:
                metrics = run_eval(step)
                value = metrics.get(cfg.best_metric)
                is_best = value is not None and (best["value"] is None or value > best["value"])
                if is_best:
                    best = {"metric": cfg.best_metric, "value": float(value), "step": step}
            is_best = dist_utils.any_rank(is_best, info, device)
        if step % cfg.save_every == 0 or is_last or is_best:
            if info.is_main:
                trainer_state = {
                    "step": step, "best": best, "last_loss": last_loss,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                    "layout": {"world": info.world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum},
                    "train": asdict(cfg),
                }
                ckpt.save_checkpoint(ckpt_root, step, lambda d: task.save_pretrained(model, d), optimizer,
                                     trainer_state, scaler, best=is_best, keep_last=cfg.keep_last)
            dist_utils.barrier(info)
    if bar is not None:
        bar.close()
    log.close()
    summary = {
        "step": step, "last_loss": last_loss, "best": best, "out_dir": str(out_dir),
        "last": str(ckpt_root / "last"), "elapsed_s": elapsed_before + time.perf_counter() - t_start,
        "stopped_by_budget": bool(stop and step < cfg.max_steps),
    }
    dist_utils.cleanup()
    torch.use_deterministic_algorithms(was_deterministic)
    return summary
