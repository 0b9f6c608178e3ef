"""Retrieval configs: ``configs/retrieval/<name>.yaml`` (or any YAML path) plus ``key=value`` overrides.

A retrieval config is data with three sections — ``embedding`` (a ``_target_`` node building a
``FeatureEmbedder``), ``index`` (``IndexConfig`` fields) and ``retriever`` (``Retriever`` settings) — and
``cache_dir``. The composed config is stored inside every bank, so a bank always knows how it was built.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from incontext.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "retrieval"

__all__ = ["available_configs", "load_config"]


def available_configs() -> list[str]:
    """Names of the configs in ``configs/retrieval``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _compose(path: Path, seen: tuple[Path, ...]) -> Any:
    """Load ``path`` and merge it over the configs its ``defaults`` list names (Hydra's order: bases first,
    ``_self_`` where listed, else last)."""
    if path in seen:
        raise InputError(f"retrieval config {path}: its defaults list includes itself")
    cfg = OmegaConf.load(path)
    defaults = list(cfg.pop("defaults", []) or [])
    if not defaults:
        return cfg
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create({})
    for d in defaults:
        if d == "_self_":
            merged = OmegaConf.merge(merged, cfg)
            continue
        base = path.parent / f"{d}.yaml"
        if not base.is_file():
            raise InputError(f"retrieval config {path}: default {d!r} not found at {base}")
        merged = OmegaConf.merge(merged, _compose(base, seen + (path,)))
    return merged


def load_config(name_or_path: str = "default", overrides: Sequence[str] = ()) -> dict:
    """The retrieval config ``name_or_path`` (a name in ``configs/retrieval`` or a YAML file) with dotted
    overrides such as ``"index.factory=HNSW32"``, as a plain dict."""
    p = Path(name_or_path).expanduser()
    if p.suffix not in (".yaml", ".yml"):
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        names = available_configs()
        near = difflib.get_close_matches(str(name_or_path), names, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(f"retrieval config: {name_or_path!r} not found (looked for {p}); {hint}"
                         f"available: {', '.join(names) or 'none'}, or pass a path to a YAML file")
    cfg = _compose(p, ())
    for i, o in enumerate(overrides):
        if "=" not in o:
            raise InputError(f"overrides[{i}]: {o!r} is not key=value (e.g. index.factory=HNSW32)")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    out = OmegaConf.to_container(cfg, resolve=True)
    for key in ("embedding", "index"):
        if key not in out:
            raise InputError(f"retrieval config {p}: missing section {key!r}")
    out.setdefault("retriever", {})
    return out
