"""Training checkpoints: Hugging Face layout for the weights, safetensors + JSON for the training state.

Layout under ``<out_dir>/checkpoints``::

    step-00000120/
        config.json                  \\ the model, exactly what ``save_pretrained`` writes: publish or load
        model.safetensors            /  this folder as is (``huggingface_hub.upload_folder``, ``from_pretrained``)
        training_state.safetensors   optimiser tensors + RNG states (JSON parts in the safetensors header)
        trainer_state.json           step, best metric, last metrics, run settings
    last -> step-00000120            symlinks, flipped atomically
    best -> step-00000100

Atomicity: a checkpoint is written into a hidden temporary folder and renamed into place only when complete;
``last`` / ``best`` are replaced with ``os.replace`` of a fresh symlink. A SIGKILL at any moment leaves either
the previous or the new checkpoint, never a torn one. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "find_resume", "load_weights", "load_training_state", "rng_state",
           "restore_rng", "write_text_atomic", "STATE_FILE", "TRAINER_FILE"]

STATE_FILE = "training_state.safetensors"
TRAINER_FILE = "trainer_state.json"
FORMAT = "incontext.train/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------------ small atomics
def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _point(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.lnk")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch (CPU and CUDA), numpy and python RNG states as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(keys, np.uint32).astype(np.int64))
    py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, state, g = meta["python"]
    random.setstate((v, tuple(state), g))


# ------------------------------------------------------------------------------------------ optimiser state
def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------ save / load
def save_checkpoint(
    root: Path,
    step: int,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    scaler: Any = None,
    best: bool = False,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``last`` (and ``best`` if asked) at it and
    prune older ones (keeping ``keep_last`` and the best).

    Args:
        root: ``<out_dir>/checkpoints``.
        step: optimiser updates completed.
        save_model: writes config.json + model.safetensors into the folder it is given.
        optimizer: its state goes to ``training_state.safetensors``.
        trainer_state: JSON-able run bookkeeping (step, best, metrics).
        scaler: optional ``torch.amp.GradScaler``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    if not final.exists():
        tmp = root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(tmp)
        opt_t, opt_meta = _flatten_optimizer(optimizer.state_dict())
        rng_t, rng_meta = rng_state()
        header = {
            "format": FORMAT,
            "optimizer": json.dumps(opt_meta),
            "rng": json.dumps(rng_meta),
            "scaler": json.dumps(scaler.state_dict() if scaler is not None and scaler.is_enabled() else None),
        }
        save_file({**opt_t, **rng_t}, str(tmp / STATE_FILE), metadata=header)
        (tmp / TRAINER_FILE).write_text(json.dumps({"format": FORMAT, **trainer_state}, indent=2))
        _fsync_tree(tmp)
        os.rename(tmp, final)
    _point(root / "last", name)
    if best:
        _point(root / "best", name)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)
    keep = {p.name for p in steps[-max(1, keep_last):]}
    for link in ("last", "best"):
        if (root / link).is_symlink():
            keep.add(os.readlink(root / link))
    for p in steps:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):  # leftovers of a killed writer
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def _complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("config.json", "model.safetensors", STATE_FILE, TRAINER_FILE))


def find_resume(root: Path) -> Path | None:
    """The checkpoint to resume from: ``last`` if complete, else the newest complete ``step-*`` folder."""
    root = Path(root)
    if not root.is_dir():
        return None
    last = root / "last"
    if last.is_symlink() and last.exists() and _complete(last.resolve()):
        return last.resolve()
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and _complete(p)),
                   key=lambda p: p.name)
    return steps[-1] if steps else None


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` into ``model`` with strict key matching."""
    state = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict(state, strict=True)


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer, scaler: Any = None) -> dict[str, Any]:
    """Restore optimiser, RNG and scaler state from ``folder``; return its trainer_state.json."""
    folder = Path(folder)
    with safe_open(str(folder / STATE_FILE), framework="pt", device="cpu") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("format") != FORMAT:
        raise ValueError(f"{folder / STATE_FILE}: format {header.get('format')!r}, expected {FORMAT!r}")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, json.loads(header["optimizer"])))
    restore_rng(tensors, json.loads(header["rng"]))
    scaler_state = json.loads(header.get("scaler", "null"))
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return json.loads((folder / TRAINER_FILE).read_text())
