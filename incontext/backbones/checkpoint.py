"""Reading user checkpoint files safely (safetensors or ``torch.load(weights_only=True)``).

Every loader in ``incontext.backbones`` goes through :func:`read_state_dict`, so a wrong file (a pickled
module, a training checkpoint without the expected keys, a truncated download) fails with one message that
names the file and what was expected.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from incontext.errors import InputError

__all__ = ["read_state_dict", "check_keys", "sha256_file", "model_id"]

# Wrapper keys used by common training scripts around the actual state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (multi-GB checkpoints fit in memory either way)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def model_id(name: str, weights: str | os.PathLike, *, seed: int = 0, arch: object = None) -> str:
    """Readable, collision-safe id of a built model, used in feature-cache keys.

    ``"<name>@seed<S>-<arch digest>"`` for random weights (the architecture is part of the id, so two tiny
    configs with one name differ), ``"<name>@<file name>-<digest of absolute path, size, mtime>"`` for files
    (cheap: multi-GB checkpoints are not hashed).
    """
    if str(weights) == "random":
        tag = f"seed{seed}-" + hashlib.sha256(repr(arch).encode()).hexdigest()[:8]
    else:
        p = Path(weights).resolve()
        st = p.stat()
        tag = p.name + "-" + hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:8]
    return f"{name}@{tag}"


def read_state_dict(path: str | os.PathLike, *, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a flat ``{key: tensor}`` state dict on CPU from a ``.safetensors`` or torch pickle file.

    Torch files are read with ``weights_only=True`` (no arbitrary code runs). A dict holding the state dict
    under one of ``state_dict``/``model``/``module``/``teacher`` is unwrapped. Raises ``InputError`` naming
    ``name`` and the path when the file cannot be read or is not a mapping of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{name}: {str(p)!r} is not a file; pass the path of a .pth/.pt/.safetensors checkpoint")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # the underlying libraries raise many types; report them as one
        raise InputError(
            f"{name}: could not read {str(p)!r} as a state dict ({type(exc).__name__}: {exc}); expected a "
            "torch state dict saved with torch.save(model.state_dict()) or a .safetensors file"
        ) from exc
    for _ in range(2):  # unwrap at most two levels, e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping) and not _is_tensor_map(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj or not _is_tensor_map(obj):
        kind = type(obj).__name__
        raise InputError(
            f"{name}: {str(p)!r} holds a {kind}, not a state dict of tensors; save the weights with "
            "torch.save(model.state_dict(), path) (or safetensors) and point the config at that file"
        )
    return {str(k): v for k, v in obj.items()}


def check_keys(
    state_dict: Mapping[str, torch.Tensor],
    expected: Iterable[str],
    *,
    name: str,
    path: str | os.PathLike | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Raise ``InputError`` when ``state_dict`` keys differ from ``expected`` (beyond ``ignore``).

    The message lists a few missing and unexpected keys so a checkpoint of another model (say a SAM file
    given as DINOv2 weights) is recognised at once.
    """
    ign = set(ignore)
    have = set(state_dict) - ign
    want = set(expected) - ign
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        where = f" in {str(path)!r}" if path is not None else ""
        raise InputError(
            f"{name}: the checkpoint{where} does not match the model: {len(missing)} missing keys "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:4]}); check that the "
            "file is the weights of this architecture (see `python -m incontext.weights`)"
        )


def _is_tensor_map(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())
