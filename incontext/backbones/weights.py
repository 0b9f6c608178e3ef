"""The table of known pretrained weights and where to find them locally.

Nothing here downloads. :func:`resolve` looks a weight up in a fixed order and either returns a local path or
raises :class:`~incontext.errors.WeightsNotFoundError` with one message: the file, every place it looked, the
official URL and the config key to set. ``python -m incontext.weights`` prints the status of every entry.

Lookup order for a file weight (first hit wins):
1. the path given in the config (a file, or a directory holding the known file name);
2. the torch hub checkpoint cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, default
   ``~/.cache/torch/hub/checkpoints``), where ``torch.hub.load_state_dict_from_url`` stores these files;
3. ``~/.cache/incontext/weights``;
4. the project's ``weights/`` folder (next to ``pyproject.toml``) and ``./weights`` of the working directory.
Hugging Face repositories (SegGPT) are looked up as a local folder first, then in the Hugging Face cache
(``local_files_only``), then in the ``weights/`` folders under the repository's last name.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from incontext.errors import InputError, WeightsNotFoundError

__all__ = [
    "KnownWeights",
    "KNOWN_WEIGHTS",
    "search_dirs",
    "find",
    "resolve",
    "weights_path",
    "default_hub_repo",
    "status_lines",
]

_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything"


@dataclass(frozen=True)
class KnownWeights:
    """One published weight.

    ``size``: bytes of the official file where known (a mismatch is reported as a probable partial
    download, not an error). ``hf_repo``: for weights published as a Hugging Face repository (no single file).
    """

    name: str
    family: str
    filename: str
    url: str
    license: str
    source: str
    size: int | None = None
    sha256: str | None = None
    hf_repo: str | None = None


def _dinov2(arch: str, reg: bool) -> KnownWeights:
    # URL pattern of dinov2/hub/backbones.py: {base}/{model_base_name}/{model_full_name}_pretrain.pth
    full = f"dinov2_{arch}_reg4" if reg else f"dinov2_{arch}"
    return KnownWeights(
        name=f"dinov2_{arch}_reg" if reg else f"dinov2_{arch}",
        family="dinov2",
        filename=f"{full}_pretrain.pth",
        url=f"{_DINOV2}/dinov2_{arch}/{full}_pretrain.pth",
        license="Apache-2.0",
        source="facebookresearch/dinov2 (torch.hub), LVD-142M pretraining",
    )


def _sam(kind: str, filename: str, size: int) -> KnownWeights:
    # File names and URLs of the segment-anything README ("Model Checkpoints"); sizes of the released files.
    return KnownWeights(
        name=f"sam_{kind}",
        family="sam",
        filename=filename,
        url=f"{_SAM}/{filename}",
        license="Apache-2.0",
        source="facebookresearch/segment-anything README, model checkpoints",
        size=size,
    )


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    w.name: w
    for w in [
        *(_dinov2(a, reg) for reg in (False, True) for a in ("vits14", "vitb14", "vitl14", "vitg14")),
        _sam("vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879),
        _sam("vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607),
        _sam("vit_b", "sam_vit_b_01ec64.pth", 375_042_383),
        KnownWeights(
            name="seggpt_vit_large",
            family="seggpt",
            filename="seggpt-vit-large",
            url="https://huggingface.co/BAAI/seggpt-vit-large",
            license="MIT",
            source="BAAI/seggpt-vit-large (transformers SegGptForImageSegmentation)",
            hf_repo="BAAI/seggpt-vit-large",
        ),
    ]
}
_ALIASES = {"dinov2_vits14_reg4": "dinov2_vits14_reg", "dinov2_vitb14_reg4": "dinov2_vitb14_reg",
            "dinov2_vitl14_reg4": "dinov2_vitl14_reg", "dinov2_vitg14_reg4": "dinov2_vitg14_reg",
            "vit_h": "sam_vit_h", "vit_l": "sam_vit_l", "vit_b": "sam_vit_b", "default": "sam_vit_h"}


def known(name: str) -> KnownWeights:
    """Table entry for ``name`` (aliases: ``vit_h``, ``dinov2_vitl14_reg4``); ``InputError`` lists the names."""
    key = _ALIASES.get(name, name)
    if key not in KNOWN_WEIGHTS:
        raise InputError(
            f"no known pretrained weights named {name!r} (known: {sorted(KNOWN_WEIGHTS)}); for a custom or "
            "tiny model set backbone.weights to a checkpoint file or to 'random'"
        )
    return KNOWN_WEIGHTS[key]


def _project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def search_dirs() -> list[Path]:
    """Directories searched after the configured path, in order (duplicates removed)."""
    dirs = [
        Path(torch.hub.get_dir()) / "checkpoints",
        Path.home() / ".cache" / "incontext" / "weights",
        _project_root() / "weights",
        Path.cwd() / "weights",
    ]
    out: list[Path] = []
    for d in dirs:
        d = d.expanduser()
        if d not in out:
            out.append(d)
    return out


def shipped(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The first ``<dir>/<name>`` folder holding ``config.json`` + ``model.safetensors`` in :func:`search_dirs`.

    The project ships the checkpoints it trains itself (``weights/sam_tiny_synthetic``, ``weights/painter_tiny``,
    ``weights/diffusion_tiny``, ``weights/vrp_tiny``, ``weights/patch_encoder_tiny``) in this layout; a user copy in
    an earlier search place wins.
    ``dirs`` replaces the search places (tests).
    """
    for d in search_dirs() if dirs is None else dirs:
        if (d / name / "model.safetensors").is_file() and (d / name / "config.json").is_file():
            return d / name
    return None


def _hf_cache_dir(repo: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or the hub library misconfigured: not found
        return None


def _is_hf_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(
        (p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    )


def find(name: str, path: str | os.PathLike | None = None) -> tuple[Path | None, list[str]]:
    """Look ``name`` up; return (found path or None, the places looked at in order)."""
    w = known(name)
    looked: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        if w.hf_repo is None and p.is_dir():
            looked.append(str(p / w.filename))
            if (p / w.filename).is_file():
                return p / w.filename, looked
        else:
            looked.append(str(p))
            ok = _is_hf_model_dir(p) if w.hf_repo else p.is_file()
            if ok:
                return p, looked
        return None, looked  # an explicit path that is wrong is not silently replaced by another copy
    if w.hf_repo:
        looked.append(f"Hugging Face cache ({w.hf_repo}, local_files_only)")
        d = _hf_cache_dir(w.hf_repo)
        if d is not None and _is_hf_model_dir(d):
            return d, looked
        for base in search_dirs()[1:]:
            cand = base / w.hf_repo.split("/")[-1]
            looked.append(str(cand))
            if _is_hf_model_dir(cand):
                return cand, looked
        return None, looked
    for d in search_dirs():
        cand = d / w.filename
        looked.append(str(cand))
        if cand.is_file():
            return cand, looked
    return None, looked


def how_to_get(w: KnownWeights) -> str:
    if w.hf_repo:
        return (
            f"`huggingface-cli download {w.hf_repo}` on a machine with network (then copy the "
            f"~/.cache/huggingface hub folder, or the files, to {search_dirs()[2] / w.hf_repo.split('/')[-1]})"
        )
    return f"`wget -P {search_dirs()[0]} {w.url}`"


def resolve(name: str, path: str | os.PathLike | None = None, *, config_key: str = "backbone.weights") -> Path:
    """Local path of weight ``name`` or ``WeightsNotFoundError`` (one line: file, places, URL, config key)."""
    w = known(name)
    found, looked = find(name, path)
    if found is None:
        what = f"Hugging Face model folder of {w.hf_repo}" if w.hf_repo else f"file {w.filename}"
        raise WeightsNotFoundError(
            f"weights {w.name!r} not found: {what} is not at {'; '.join(looked)}. Get it: {how_to_get(w)}; "
            f"or set {config_key}=/path/to/{w.filename} (or weights=random for an untrained model)"
        )
    if w.size is not None and found.is_file() and found.stat().st_size != w.size:
        warnings.warn(
            f"{found} has {found.stat().st_size} bytes, the official {w.filename} has {w.size}: "
            "possibly an incomplete download",
            stacklevel=2,
        )
    return found


def weights_path(
    name: str | None, weights: str | os.PathLike | None, *, config_key: str = "backbone.weights"
) -> Path | str:
    """What a builder should load: ``"random"``, or an existing local path.

    ``weights=None`` looks the known weight ``name`` up (:func:`resolve`); a path for a known name may also be
    a directory holding the official file; a path for a custom model must exist. Missing files raise
    ``WeightsNotFoundError``; unknown names with ``weights=None`` raise ``InputError``.
    """
    if weights is not None and str(weights) == "random":
        return "random"
    key = _ALIASES.get(name or "", name or "")
    if weights is None:
        if name is None:
            raise InputError(f"no weights given; set {config_key} to a checkpoint file or to 'random'")
        return resolve(name, None, config_key=config_key)
    if key in KNOWN_WEIGHTS:
        return resolve(key, weights, config_key=config_key)
    p = Path(weights).expanduser()
    if not p.exists():
        raise WeightsNotFoundError(
            f"weights for {name!r} not found: {p} does not exist; set {config_key} to an existing checkpoint "
            "(.pth/.pt/.safetensors) or to 'random'"
        )
    return p


def default_hub_repo() -> Path | None:
    """The torch hub cache clone of facebookresearch/dinov2, if present (``main`` or ``master`` ref)."""
    hub = Path(torch.hub.get_dir())
    for ref in ("main", "master"):
        p = hub / f"facebookresearch_dinov2_{ref}"
        if (p / "hubconf.py").is_file():
            return p
    return None


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def status_lines() -> list[str]:
    """One line per known weight: name, then FOUND + path (+ size warning) or MISSING + where + how to get it."""
    width = max(len(n) for n in KNOWN_WEIGHTS)
    lines = []
    for name, w in KNOWN_WEIGHTS.items():
        found, looked = find(name)
        if found is not None:
            extra = ""
            if found.is_file():
                size = found.stat().st_size
                extra = f" ({_human(size)})"
                if w.size is not None and size != w.size:
                    extra += f" WARNING: expected {w.size} bytes, possibly incomplete"
            lines.append(f"{name:<{width}}  found    {found}{extra}")
        else:
            lines.append(
                f"{name:<{width}}  MISSING  looked in: {', '.join(looked)}; get it: {how_to_get(w)}"
            )
    return lines


def main() -> int:
    """Entry point of ``python -m incontext.weights``: print the status table; always exit 0."""
    for line in status_lines():
        print(line)
    repo = default_hub_repo()
    hub_line = (
        f"found    {repo}" if repo is not None else
        f"MISSING  looked in: {Path(torch.hub.get_dir()) / 'facebookresearch_dinov2_main'}; only needed for "
        "backbone.source=hub; get it: `git clone https://github.com/facebookresearch/dinov2 "
        f"{Path(torch.hub.get_dir()) / 'facebookresearch_dinov2_main'}`"
    )
    width = max(len(n) for n in KNOWN_WEIGHTS)
    print(f"{'dinov2 hub code':<{width}}  {hub_line}")
    return 0
