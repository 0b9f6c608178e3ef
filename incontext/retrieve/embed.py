"""Image- and object-level embeddings for the prompt bank, computed from any dense feature extractor.

One recipe serves every backbone. A ``DenseFeatures`` extractor maps an image to a grid (C, h, w) — the
project's offline colour + texture features (default; no weights needed), or DINOv2 patch tokens through
:class:`DinoV2Dense`. From the grid:

* **cells** are standardised per channel, ``z = (f - mu) / sigma``, with ``mu, sigma`` fitted on the bank's
  own images when the bank is first built (``standardize=True``; the handcrafted channels have unrelated units)
  or left as they are (``standardize=False``; DINOv2 tokens are already comparable);
* the **image-level** vector (the index key; a query has no mask) concatenates the parts named in
  ``image_pool``: ``mean`` and ``std`` of the cells, ``grid`` (a g x g grid of cell means: coarse layout) and
  ``cls`` (DINOv2's CLS token), each part L2-normalised, then the whole L2-normalised;
* the **object-level** vector is the mask-weighted mean of the cells (mask pooled by area onto the grid),
  L2-normalised: the concept's prototype, used for re-ranking, diversity and concept ranking.

Everything that depends on the fitted statistics is affine in the raw cell sums, so what is computed per image
(and cached, keyed by content hash) is a *raw record* of means and sums; the embedding is applied afterwards.
An :class:`EmbeddingSpec` (name, hash of the configuration and fitted statistics, dimensions) identifies an
embedding exactly; a bank refuses vectors whose spec differs from its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from incontext.errors import InputError

__all__ = [
    "DinoV2Dense",
    "EmbeddingCache",
    "EmbeddingSpec",
    "FeatureEmbedder",
    "QueryEmbedding",
    "build_embedder",
    "content_hash",
    "raw_records",
]

# Keys left out of an embedding's identity: they change speed, not vectors.
_NON_IDENTITY_KEYS = {"batch_size", "device"}


def content_hash(image: np.ndarray, mask: np.ndarray | None = None) -> str:
    """SHA-1 of decoded pixels (and of the 0/1 foreground of ``mask`` when given), hex.

    Hashing pixels, not file bytes, makes the same picture match whether it arrives as a path, a re-encoded
    file or an array.
    """
    h = hashlib.sha1()
    a = np.ascontiguousarray(image)
    h.update(f"{a.shape}|{a.dtype}".encode())
    h.update(a.data)
    if mask is not None:
        m = np.ascontiguousarray(np.asarray(mask) > 0)
        h.update(f"|mask{m.shape}".encode())
        h.update(np.packbits(m).data)
    return h.hexdigest()


def _identity(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        return {k: _identity(v) for k, v in sorted(cfg.items()) if k not in _NON_IDENTITY_KEYS}
    if isinstance(cfg, (list, tuple)):
        return [_identity(v) for v in cfg]
    return cfg


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which embedding produced a set of vectors.

    Attributes:
        name: readable description (extractor and pooling).
        config_hash: 12 hex digits of SHA-1 over the configuration and the fitted statistics.
        image_dim: length of image-level vectors (the index key).
        object_dim: length of object-level vectors and of query cells.
    """

    name: str
    config_hash: str
    image_dim: int
    object_dim: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "EmbeddingSpec":
        return cls(str(d["name"]), str(d["config_hash"]), int(d["image_dim"]), int(d["object_dim"]))

    def check(self, other: "EmbeddingSpec", what: str = "query") -> None:
        """Raise ``InputError`` unless ``other`` (the ``what``'s embedding) equals this (the bank's)."""
        if other != self:
            raise InputError(
                f"{what}: embedded with {other.name} (config {other.config_hash}, dim {other.image_dim}) but the "
                f"bank was built with {self.name} (config {self.config_hash}, dim {self.image_dim}); embed the "
                "query with the bank's own embedder (PromptBank.embedder / Retriever does this), or rebuild the "
                "bank with this embedding (python -m incontext.bank build ... --config <retrieval config>)"
            )


@dataclass
class QueryEmbedding:
    """A query image's embedding.

    Attributes:
        vector: (image_dim,) unit image-level vector.
        cells: (M, object_dim) unit standardised grid cells, row-major over the (h, w) feature grid.
        grid: (h, w) of the feature grid.
        sha1: ``content_hash`` of the image.
        spec: the embedding that produced it.
    """

    vector: np.ndarray
    cells: np.ndarray
    grid: tuple[int, int]
    sha1: str
    spec: EmbeddingSpec


class DinoV2Dense:
    """DINOv2 patch tokens as a dense grid (the ``DenseFeatures`` protocol) plus the CLS token.

    Args:
        model: backbone name for ``incontext.backbones.dinov2.build_dinov2`` (``dinov2_vits14``, ...).
        weights: checkpoint path, ``"random"`` (tests), or None = the locally registered file (a clear
            ``WeightsNotFoundError`` names it when absent).
        source, arch, seed, hub_repo: forwarded to ``build_dinov2``.
        size: square input side in pixels (multiple of 14); 224 gives a 16 x 16 grid.
        layer: ``"normed"`` (after the final LayerNorm; CLS likewise) or ``"prenorm"`` (Matcher's choice).
        block: transformer block whose tokens are used (-1 = last).
        device: where the network runs.
    """

    def __init__(
        self,
        model: str = "dinov2_vits14",
        weights: str | None = None,
        source: str = "incontext",
        size: int = 224,
        layer: str = "normed",
        block: int = -1,
        arch: dict | None = None,
        seed: int = 0,
        hub_repo: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from incontext.backbones.dinov2 import build_dinov2

        if layer not in ("normed", "prenorm"):
            raise InputError(f"embedding.features.layer={layer!r}; use 'normed' or 'prenorm'")
        self.net = build_dinov2(
            model, arch=arch, source=source, weights=weights, seed=seed, hub_repo=hub_repo, device=device
        )
        self.size = int(size)
        self.layer = layer
        self.block = int(block)
        self.name = f"dinov2({self.net.name},size={self.size},layer={layer},block={self.block})"

    @property
    def dim(self) -> int:
        return int(self.net.embed_dim)

    def to(self, device: str | torch.device) -> "DinoV2Dense":
        self.net.to(device)
        return self

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (each (H, W, 3) uint8) -> grids (B, C, h, w) and CLS tokens (B, C), float32 on CPU."""
        x = self.net.preprocess(list(images), size=self.size)
        out = self.net.patch_tokens(x, block=self.block, batch_size=len(images))
        tok = out["normed" if self.layer == "normed" else "prenorm"].float()
        cls = out["cls_normed" if self.layer == "normed" else "cls"].float()
        h, w = self.net.grid(x)
        grid = tok.transpose(1, 2).reshape(len(images), tok.shape[-1], h, w)
        return grid.cpu(), cls.cpu()

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, h, w) float32."""
        return self.encode_batch([image])[0][0]


def _pool_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    m = torch.as_tensor(np.asarray(mask) > 0, dtype=torch.float32)[None, None]
    return F.adaptive_avg_pool2d(m, hw)[0, 0].numpy()


def _raw_from_grid(
    grid: torch.Tensor, cls: torch.Tensor | None, mask: np.ndarray | None, n_grid: int
) -> dict[str, np.ndarray]:
    """Raw (unstandardised) statistics of one grid (C, h, w): see the module docstring."""
    f = grid.float().cpu()
    c, h, w = f.shape
    cells = f.reshape(c, h * w).T.double().numpy()  # (M, C)
    rec: dict[str, np.ndarray] = {
        "mean": cells.mean(0),
        "std": cells.std(0),
        "sum": cells.sum(0),
        "sumsq": (cells * cells).sum(0),
        "n": np.array([h * w], np.float64),
        "hw": np.array([h, w], np.int64),
    }
    if n_grid > 0:
        g = F.adaptive_avg_pool2d(f[None], (n_grid, n_grid))[0]  # (C, g, g)
        rec["grid"] = g.reshape(c, -1).T.double().numpy()  # (g*g, C)
    if cls is not None:
        rec["cls"] = cls.double().cpu().numpy()
    if mask is not None:
        wgt = _pool_mask(mask, (h, w)).reshape(-1).astype(np.float64)
        total = wgt.sum()
        rec["obj"] = (wgt @ cells) / total if total > 0 else np.full(c, np.nan)
        rec["obj_w"] = np.array([total])
    return rec


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


class FeatureEmbedder:
    """Image- and object-level embeddings from a dense feature extractor (see the module docstring).

    Args:
        features: a ``DenseFeatures`` extractor; one with ``encode_batch`` (``DinoV2Dense``) runs in batches
            and can provide ``cls``.
        image_pool: parts of the image-level vector: any of ``"mean"``, ``"std"``, ``"grid"``, ``"cls"``.
        grid: side g of the ``grid`` part.
        standardize: fit per-channel cell statistics on the bank's images (True) or use raw cells (False).
        batch_size: images per batch.
    """

    def __init__(
        self,
        features: Any,
        image_pool: Sequence[str] = ("mean", "std"),
        grid: int = 2,
        standardize: bool = True,
        batch_size: int = 16,
    ) -> None:
        unknown = sorted(set(image_pool) - {"mean", "std", "grid", "cls"})
        if unknown or not image_pool:
            raise InputError(f"embedding.image_pool={list(image_pool)}; use a non-empty subset of mean, std, grid, cls")
        if "cls" in image_pool and not hasattr(features, "encode_batch"):
            raise InputError(
                f"embedding.image_pool includes 'cls' but {getattr(features, 'name', features)} has no CLS token; "
                "use DinoV2Dense features or drop 'cls'"
            )
        self.features = features
        self.image_pool = tuple(image_pool)
        self.grid = int(grid) if "grid" in self.image_pool else 0
        self.standardize = bool(standardize)
        self.batch_size = max(1, int(batch_size))
        self.config: dict = {}
        self.mu: np.ndarray | None = None
        self.sigma: np.ndarray | None = None

    # ------------------------------------------------------------------ identity
    @property
    def fitted(self) -> bool:
        return not self.standardize or self.mu is not None

    def raw_key(self) -> str:
        """Cache namespace: what raw records depend on (extractor and pooling, not fitted statistics)."""
        ident = {"features": getattr(self.features, "name", type(self.features).__name__),
                 "grid": self.grid, "cls": "cls" in self.image_pool, "v": 1}
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def spec(self) -> EmbeddingSpec:
        if not self.fitted:
            raise AssertionError("FeatureEmbedder.spec before fit")
        h = hashlib.sha1()
        h.update(json.dumps({"config": _identity(self.config), "features": self.features.name,
                             "pool": self.image_pool, "grid": self.grid, "std": self.standardize},
                            sort_keys=True, default=str).encode())
        if self.standardize:
            h.update(np.asarray(self.mu, np.float32).tobytes())
            h.update(np.asarray(self.sigma, np.float32).tobytes())
        name = f"{self.features.name}|pool={'+'.join(self.image_pool)}" + (f"{self.grid}" if self.grid else "") \
            + f"|standardize={self.standardize}"
        return EmbeddingSpec(name, h.hexdigest()[:12], self._image_dim(), self._object_dim())

    def _object_dim(self) -> int:
        if self.mu is not None:
            return len(self.mu)
        d = getattr(self.features, "dim", None)
        if d is None:
            raise AssertionError("object dimension unknown before the first record")
        return int(d)

    def _image_dim(self) -> int:
        c = self._object_dim()
        sizes = {"mean": c, "std": c, "grid": self.grid * self.grid * c, "cls": c}
        return sum(sizes[p] for p in self.image_pool)

    def state_dict(self) -> dict:
        """Fitted statistics (JSON-able)."""
        if not self.standardize:
            return {}
        return {"mu": np.asarray(self.mu).tolist(), "sigma": np.asarray(self.sigma).tolist()}

    def load_state(self, state: dict) -> None:
        if self.standardize:
            self.mu = np.asarray(state["mu"], np.float64)
            self.sigma = np.asarray(state["sigma"], np.float64)

    # ------------------------------------------------------------------ raw records
    def raw(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> list[dict]:
        """Raw records for a batch (see ``_raw_from_grid``)."""
        if hasattr(self.features, "encode_batch"):
            grids, cls = self.features.encode_batch(images)
            want_cls = "cls" in self.image_pool
            return [_raw_from_grid(grids[i], cls[i] if want_cls else None, masks[i], self.grid)
                    for i in range(len(images))]
        return [_raw_from_grid(self.features(img), None, m, self.grid) for img, m in zip(images, masks)]

    def fit(self, records: Sequence[dict]) -> None:
        """Fit the per-channel cell statistics on the bank's first records (no-op without standardisation)."""
        if not self.standardize:
            return
        if not records:
            raise InputError("bank: no entries to fit the embedding statistics on; add at least one image")
        n = sum(float(r["n"][0]) for r in records)
        s = sum(r["sum"] for r in records)
        ss = sum(r["sumsq"] for r in records)
        mu = s / n
        var = np.maximum(ss / n - mu * mu, 0.0)
        # A channel that never varies in the bank would divide by ~0; floor it relative to the others.
        floor = max(1e-6, 1e-3 * float(np.sqrt(var).max()))
        self.mu, self.sigma = mu, np.maximum(np.sqrt(var), floor)

    # ------------------------------------------------------------------ embeddings
    def _z(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mu) / self.sigma if self.standardize else x

    def image_vectors(self, records: Sequence[dict]) -> np.ndarray:
        """(N, image_dim) float32 unit vectors."""
        parts = []
        for p in self.image_pool:
            if p == "mean":
                v = self._z(np.stack([r["mean"] for r in records]))
            elif p == "std":
                v = np.stack([r["std"] for r in records])
                v = v / self.sigma if self.standardize else v
            elif p == "grid":
                g = np.stack([r["grid"] for r in records])  # (N, g*g, C)
                v = self._z(g).reshape(len(records), -1)
            else:
                v = np.stack([r["cls"] for r in records])
            parts.append(_unit(v))
        return _unit(np.concatenate(parts, axis=1)).astype(np.float32)

    def object_vectors(self, records: Sequence[dict]) -> np.ndarray:
        """(N, object_dim) float32 unit vectors (rows of NaN for records without a mask)."""
        obj = np.stack([r.get("obj", np.full(self._object_dim(), np.nan)) for r in records])
        return _unit(self._z(obj)).astype(np.float32)

    def query(self, image: np.ndarray) -> QueryEmbedding:
        """Embed a query image ((H, W, 3) uint8): image vector and standardised unit cells."""
        if hasattr(self.features, "encode_batch"):
            grids, cls = self.features.encode_batch([image])
            grid, cls0 = grids[0], cls[0]
        else:
            grid, cls0 = self.features(image), None
        rec = _raw_from_grid(grid, cls0 if "cls" in self.image_pool else None, None, self.grid)
        c, h, w = grid.shape
        cells = grid.float().cpu().reshape(c, h * w).T.double().numpy()
        return QueryEmbedding(
            vector=self.image_vectors([rec])[0],
            cells=_unit(self._z(cells)).astype(np.float32),
            grid=(h, w),
            sha1=content_hash(image),
            spec=self.spec,
        )

    def probe(self) -> np.ndarray:
        """Image vector of a fixed synthetic image: a fingerprint of what the feature *code* computes.

        Stored with a bank and recomputed on load, it catches a change of the extractor's implementation that
        the configuration hash cannot see (the stored vectors would no longer match new queries)."""
        yy, xx = np.mgrid[0:96, 0:112].astype(np.float32)
        img = np.stack([xx * 2.2, yy * 2.6, 128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)], -1)
        img[30:70, 40:90] = ((((xx[30:70, 40:90] // 6 + yy[30:70, 40:90] // 6) % 2) * 180 + 40)[..., None]
                             * np.array([1.0, 0.4, 0.2], np.float32))
        return self.query(np.clip(img, 0, 255).astype(np.uint8)).vector

    def object_vector(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(object_dim,) unit vector of the masked object in ``image``."""
        return self.object_vectors(self.raw([image], [mask]))[0]


def build_embedder(cfg: dict, device: str | torch.device = "cpu") -> FeatureEmbedder:
    """Instantiate an embedder from its config (``_target_`` nodes, as in ``configs/retrieval/*.yaml``).

    Only targets inside the ``incontext`` package are accepted: a bank's stored config is data from disk and
    must not be able to call arbitrary code.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from incontext.errors import WeightsNotFoundError

    cfg = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    _check_targets(cfg)
    node = OmegaConf.create(cfg)
    if "features" in node and isinstance(node.features, dict | type(node)) and "_target_" in node.features:
        if "device" in _init_params(node.features._target_):
            node.features.device = str(device)
    try:
        emb = instantiate(node, _convert_="all")
    except InstantiationException as exc:
        # Hydra wraps every error; surface ours (bad settings, missing weights) with their own type.
        cause = exc.__cause__
        if isinstance(cause, WeightsNotFoundError):
            raise WeightsNotFoundError(f"{cause} [prompt bank / retrieval config key: embedding.features.weights]") \
                from cause
        if isinstance(cause, (InputError, FileNotFoundError)):
            raise cause from None
        raise
    if not isinstance(emb, FeatureEmbedder):
        raise InputError(f"embedding._target_ builds {type(emb).__name__}; it must build a FeatureEmbedder")
    emb.config = cfg
    return emb


def _init_params(target: str) -> set[str]:
    import importlib
    import inspect

    mod, _, attr = target.rpartition(".")
    obj = getattr(importlib.import_module(mod), attr)
    return set(inspect.signature(obj).parameters)


def _check_targets(cfg: Any) -> None:
    if isinstance(cfg, dict):
        t = cfg.get("_target_")
        if t is not None and not str(t).startswith("incontext."):
            raise InputError(
                f"embedding config: _target_ {t!r} is outside the incontext package; only incontext classes "
                "may be instantiated from a bank or retrieval config"
            )
        for v in cfg.values():
            _check_targets(v)
    elif isinstance(cfg, list):
        for v in cfg:
            _check_targets(v)


class EmbeddingCache:
    """Raw records on disk, keyed by extractor (``FeatureEmbedder.raw_key``) and content hash.

    Layout: ``<root>/<raw_key>/<kind>/<sha1[:2]>/<sha1>.npz``, each written atomically. ``kind`` is ``img``
    for image-only records and ``obj`` for (image, mask) records.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def _path(self, ns: str, kind: str, key: str) -> Path:
        return self.root / ns / kind / key[:2] / f"{key}.npz"

    def get(self, ns: str, kind: str, key: str) -> dict | None:
        p = self._path(ns, kind, key)
        if not p.is_file():
            return None
        try:
            with np.load(p) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            return None  # a damaged cache entry is recomputed, never trusted

    def put(self, ns: str, kind: str, key: str, rec: dict) -> None:
        from incontext.io import atomic_path

        p = self._path(ns, kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **rec)


def raw_records(
    embedder: FeatureEmbedder,
    items: Iterable[tuple[np.ndarray, np.ndarray | None, Any]],
    total: int | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    desc: str = "embed",
) -> Iterator[tuple[dict, Any]]:
    """Raw records of (image, mask or None, payload) items, in order, as (record, payload) pairs.

    Computed in batches of ``embedder.batch_size`` with a progress bar on stderr, looked up in and stored to
    ``cache``. Each record also carries ``image_sha1`` and ``mask_sha1`` (hex; None without a mask).
    """
    from tqdm import tqdm

    ns = embedder.raw_key()
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False)
    batch: list[tuple[np.ndarray, np.ndarray | None, str, str | None, Any]] = []

    def flush() -> Iterator[tuple[dict, Any]]:
        recs: list[dict | None] = []
        for img, m, ih, mh, _ in batch:
            recs.append(cache.get(ns, "obj" if m is not None else "img", mh or ih) if cache is not None else None)
        todo = [i for i, r in enumerate(recs) if r is None]
        if todo:
            fresh = embedder.raw([batch[i][0] for i in todo], [batch[i][1] for i in todo])
            for i, rec in zip(todo, fresh):
                recs[i] = rec
                if cache is not None:
                    _, m, ih, mh, _ = batch[i]
                    cache.put(ns, "obj" if m is not None else "img", mh or ih, rec)
        for (_, _, ih, mh, payload), rec in zip(batch, recs):
            rec = dict(rec)
            rec["image_sha1"], rec["mask_sha1"] = ih, mh
            yield rec, payload
        bar.update(len(batch))
        batch.clear()

    try:
        for img, m, payload in items:
            ih = content_hash(img)
            mh = content_hash(img, m) if m is not None else None
            batch.append((img, m, ih, mh, payload))
            if len(batch) >= embedder.batch_size:
                yield from flush()
        if batch:
            yield from flush()
    finally:
        bar.close()
