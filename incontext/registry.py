"""Build methods by name from their Hydra configs (``configs/method/<name>.yaml``).

A method config is data: its root ``_target_`` names a ``Segmenter`` class and the rest are its settings, with
the source of every published value in a comment. ``build("matcher_fss", device="cuda")`` composes that file
(resolving its defaults list, e.g. a backbone), applies overrides and instantiates it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from incontext.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_dir() -> Path:
    if not (CONFIG_DIR / "method").is_dir():
        raise InputError(
            f"configs: no configs/method folder at {CONFIG_DIR}; install incontext from its repository "
            "with `pip install -e .` so the configs folder sits beside the package"
        )
    return CONFIG_DIR


def available() -> list[str]:
    """Names of every method that ``build`` accepts."""
    return sorted(p.stem for p in (_config_dir() / "method").glob("*.yaml"))


def compose_method(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config node of method ``name`` (Hydra override strings apply inside the method,
    e.g. ``"match.threshold=0.4"``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    names = available()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(f"method: unknown name {name!r}; {hint}available: {', '.join(names)}")
    hydra_overrides = [f"+method={name}"] + [f"method.{o}" for o in overrides]
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="_build", overrides=hydra_overrides)
    else:
        with initialize_config_dir(config_dir=str(_config_dir()), version_base="1.3"):
            cfg = compose(config_name="_build", overrides=hydra_overrides)
    node = cfg.method
    OmegaConf.set_struct(node, False)
    node.setdefault("name", name)
    return node


def instantiate_method(node: DictConfig | dict, **kwargs: Any) -> Any:
    """Instantiate a composed method node (as Hydra apps have it in ``cfg.method``), after setting
    ``kwargs`` (top-level settings such as ``device`` or ``checkpoint``; dotted keys reach inside)."""
    from hydra.utils import instantiate

    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True)) if not isinstance(node, dict) \
        else OmegaConf.create(node)
    objects: dict[str, Any] = {}
    for key, value in kwargs.items():
        if value is None or isinstance(value, (str, int, float, bool, list, tuple, dict)):
            OmegaConf.update(node, key, value, force_add=True)
        elif "." in key:
            raise InputError(f"{key}: only plain values can be set inside a stage; pass objects top-level")
        else:  # live objects (a retriever, a model) go straight to the constructor
            objects[key] = value
    if "_target_" not in node:
        raise InputError("method: the config has no _target_; point it at a Segmenter class")
    return instantiate(node, _convert_="partial", **objects)


def build(name: str, overrides: Sequence[str] = (), **kwargs: Any) -> Any:
    """Build method ``name`` from ``configs/method/<name>.yaml``.

    Args:
        name: a name from ``available()``.
        overrides: Hydra override strings inside the method (``["match.threshold=0.4"]``).
        **kwargs: settings to set before instantiation (``device="cuda"``, ``checkpoint="path"``); a dotted
            key may be passed with ``**{"match.threshold": 0.4}``.

    Returns:
        A ``Segmenter``.
    """
    return instantiate_method(compose_method(name, overrides), **kwargs)
