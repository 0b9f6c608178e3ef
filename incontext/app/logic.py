"""The web app's work as plain functions and small classes on arrays and files (no gradio), testable without a
browser.

Frames and forms:

* images: ``(H, W, 3) uint8`` RGB at their displayed size (what :func:`incontext.io.read_image` returns);
* masks: ``(H, W) uint8`` label maps, 0 = background (a marked support is 0/1);
* clicks: ``(x, y, label)`` with x = column and y = row in image pixels (the order gradio's select events
  report), label 1 = on the object, 0 = background.

Every problem a user can fix raises :class:`incontext.errors.InputError` with a message meant for the page.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from incontext.episode import Context, Support
from incontext.errors import InputError
from incontext.io import read_image, read_mask, write_mask_png, write_overlay_png

__all__ = [
    "ClickSegmenter",
    "Models",
    "Banks",
    "QueryResult",
    "Session",
    "BankHit",
    "default_method",
    "method_summary",
    "read_upload_image",
    "read_upload_mask",
    "editor_mask",
    "make_support",
    "support_key",
    "prepare_concept",
    "load_concept",
    "run_queries",
    "draw_clicks",
    "write_support_preview",
    "bank_search",
    "bank_concepts",
]

# Preferred default method, in order: the generalist preset when it is installed, else the offline baseline.
DEFAULT_METHODS = ("generalist", "prototype")


# ------------------------------------------------------------------------------------------------ methods
def default_method(names: Sequence[str]) -> str:
    """The method selected when the page opens: the first of ``DEFAULT_METHODS`` in ``names``, else the first
    name."""
    for name in DEFAULT_METHODS:
        if name in names:
            return name
    if not names:
        raise InputError("methods: no method configs found in configs/method; reinstall incontext with "
                         "`pip install -e .`")
    return sorted(names)[0]


def method_summary(name: str, config_dir: Path | None = None) -> str:
    """The leading comment block of ``configs/method/<name>.yaml`` as one paragraph ('' when it has none)."""
    from incontext.registry import CONFIG_DIR

    path = (config_dir or CONFIG_DIR) / "method" / f"{name}.yaml"
    if not path.is_file():
        return ""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(x for x in lines if x)


class Models:
    """Methods built once per name (``incontext.build(name, device=...)``) and shared by every page.

    ``lock`` serialises inference: the machine's cores are shared, and one run at a time keeps each fast.
    """

    def __init__(self, device: str = "cpu", builder: Callable[..., Any] | None = None) -> None:
        self.device = device
        self._builder = builder
        self._models: dict[str, Any] = {}
        self._build_lock = threading.Lock()
        self.lock = threading.RLock()

    def get(self, name: str) -> Any:
        """The ``Segmenter`` for method ``name`` (built on first use)."""
        with self._build_lock:
            if name not in self._models:
                if self._builder is None:
                    from incontext.registry import build

                    self._models[name] = build(name, device=self.device)
                else:
                    self._models[name] = self._builder(name, device=self.device)
            return self._models[name]


# ------------------------------------------------------------------------------------------------ uploads
def _upload_label(what: str, path: str | Path) -> str:
    return f"{what} '{Path(path).name}'"


def read_upload_image(path: str | Path | None, *, what: str, max_pixels: int) -> np.ndarray:
    """An uploaded file as ``(H, W, 3) uint8``; messages name the file as the user called it.

    Args:
        path: where the web server stored the upload (its file name is the user's).
        what: what the image is for ("support image", "query", ...).
        max_pixels: refuse larger images (checked on the header, before decoding).
    """
    if path is None:
        raise InputError(f"{what}: nothing uploaded; choose an image file (JPEG, PNG, WebP, ...)")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: the upload {p.name!r} is gone from the server; upload it again")
    try:
        return read_image(p.read_bytes(), name=_upload_label(what, p), max_pixels=max_pixels)
    except InputError as err:
        if "max_pixels" not in str(err):
            raise
        # read_image's advice names the Python argument; here the limit is the app's flag.
        raise InputError(f"{err} (this app's limit; start it with --max-pixels N to change it)") from None


def read_upload_mask(path: str | Path | None, image: np.ndarray, *, max_pixels: int) -> np.ndarray:
    """An uploaded mask file as an ``(H, W) uint8`` label map matching ``image`` ((H, W, 3)) in size."""
    if path is None:
        raise InputError("mask file: nothing uploaded; choose the mask PNG of this support image (0 = background)")
    p = Path(path)
    label = _upload_label("mask file", p)
    mask = read_mask(p.read_bytes(), name=label, max_pixels=max_pixels)
    if mask.shape != image.shape[:2]:
        raise InputError(
            f"{label}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but the support image is "
            f"{image.shape[1]}x{image.shape[0]} (width x height); upload the mask drawn on this image"
        )
    return mask


def _resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))


def editor_mask(value: dict | None, size: tuple[int, int]) -> np.ndarray:
    """The painted strokes of an image-editor value as a 0/1 mask of ``size`` = (H, W).

    Args:
        value: ``{"background", "layers", "composite"}`` with RGBA ``(h, w, 4)`` uint8 arrays (gradio's
            ``ImageEditor(type="numpy", image_mode="RGBA")``); a stroke is any pixel with alpha > 0 on a layer.
        size: the support image's (H, W); an editor canvas of another size is resized (nearest neighbour).
    """
    layers = [] if not value else [np.asarray(x) for x in (value.get("layers") or []) if x is not None]
    painted = None
    for layer in layers:
        if layer.ndim == 3 and layer.shape[2] == 4:
            stroke = layer[..., 3] > 0
        elif layer.ndim == 3:
            stroke = layer.any(axis=2)  # a flattened layer: unpainted pixels are black
        else:
            stroke = layer > 0
        painted = stroke if painted is None else (painted | stroke) if painted.shape == stroke.shape else painted
    if painted is None or not painted.any():
        raise InputError(
            "brush: nothing painted; paint over the object in the support image (or switch to clicks or a mask file)"
        )
    mask = painted.astype(np.uint8)
    if mask.shape != tuple(size):
        mask = _resize_nearest(mask, size)
    return mask


def make_support(image: np.ndarray, mask: np.ndarray | None, name: str, how: str) -> Support:
    """A ``Support`` from a marked image; ``how`` names the marking tool for the empty-mask message."""
    if mask is None or not np.any((mask != 0) & (mask != 255)):
        fixes = {
            "brush": "paint over the object with the brush",
            "clicks": "click on the object so SAM can outline it",
            "mask file": "upload a mask whose object pixels are non-zero",
        }
        raise InputError(f"{name}: the object mask is empty; {fixes.get(how, 'mark the object')} before adding it")
    return Support(image, mask, name=name)


# ------------------------------------------------------------------------------------------------ clicks
class ClickSegmenter:
    """Clicks to a mask with a SAM predictor (``BatchedSamPredictor``), the image encoding cached per image.

    Following SAM's interactive use: one click asks for three candidate masks and keeps the one with the highest
    predicted IoU (a single click is ambiguous: part, object or group); several clicks ask for one mask.

    Args:
        predictor: a ``BatchedSamPredictor`` (or a factory returning one, called on first use, so the page opens
            without loading SAM).
        cache_size: image encodings kept.
    """

    def __init__(self, predictor: Any, cache_size: int = 4) -> None:
        self._predictor = predictor
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()

    @property
    def predictor(self) -> Any:
        if callable(self._predictor) and not hasattr(self._predictor, "decode"):
            self._predictor = self._predictor()
        return self._predictor

    def mask(self, image: np.ndarray, clicks: Sequence[tuple[float, float, int]]) -> np.ndarray:
        """``(H, W) bool`` mask for ``clicks`` on ``image`` ((H, W, 3) uint8)."""
        if not clicks:
            raise InputError("clicks: none yet; click on the object in the support image")
        h, w = image.shape[:2]
        pts = np.asarray([[float(x), float(y)] for x, y, _ in clicks], np.float64)
        labels = np.asarray([int(lab) for _, _, lab in clicks], np.int64)
        if ((pts[:, 0] < 0) | (pts[:, 0] >= w) | (pts[:, 1] < 0) | (pts[:, 1] >= h)).any():
            raise InputError(f"clicks: {pts.tolist()} fall outside the {w}x{h} image; click inside the image")
        if not (labels == 1).any():
            raise InputError("clicks: only background clicks; click at least once on the object")
        with self._lock:
            pred = self.predictor
            key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
            if key in self._cache:
                self._cache.move_to_end(key)
                pred.set_embedding(self._cache[key])
            else:
                self._cache[key] = pred.embed(np.ascontiguousarray(image))
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            res = pred.decode(points=pts[None], labels=labels[None], multimask_output=len(pts) == 1)
            best = int(res.iou_pred[0].argmax())
            return res.masks[0, best].detach().cpu().numpy().astype(bool)


# ------------------------------------------------------------------------------------------------ session
@dataclass
class Session:
    """One page's state.

    Attributes:
        supports: the marked examples, in the order added.
        image, image_name: the support image being marked.
        clicks: clicks on ``image`` ((x, y, label)); ``click_mask`` is SAM's answer to them.
        concept, concept_name: a concept loaded from a file (used when there are no supports).
        prepared: (key, Context, saved file) for the current supports and method, so re-running does not
            re-encode.
        bank_hits: the examples the last prompt-bank search returned (to use as supports).
        workdir: this page's output folder.
        runs: segmentation runs so far (each writes its own sub-folder).
    """

    supports: list[Support] = field(default_factory=list)
    image: np.ndarray | None = None
    image_name: str | None = None
    clicks: list[tuple[int, int, int]] = field(default_factory=list)
    click_mask: np.ndarray | None = None
    concept: Context | None = None
    concept_name: str | None = None
    prepared: tuple[str, Context, Path] | None = None
    bank_hits: list[Support] = field(default_factory=list)
    workdir: Path | None = None
    runs: int = 0

    def folder(self, root: Path) -> Path:
        """This page's output folder under ``root`` (created on first use)."""
        import tempfile

        if self.workdir is None or not self.workdir.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="page-", dir=root))
        return self.workdir

    def close(self) -> None:
        """Remove this page's output folder (the page was closed; what it offered was copied by the server)."""
        import shutil

        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def support_key(method: str, supports: Sequence[Support]) -> str:
    """A digest of the method name and every support's pixels and mask (what a prepared concept depends on)."""
    h = hashlib.sha1(method.encode())
    for s in supports:
        for a in (s.image, s.mask):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
    return stem[:80]


def prepare_concept(model: Any, supports: Sequence[Support], out_dir: Path) -> tuple[Context, Path, float]:
    """Encode the supports with ``model`` and save the concept.

    Returns:
        (context, path of ``concept_<method>.safetensors`` in ``out_dir``, seconds spent preparing).
    """
    if not supports:
        raise InputError("supports: none yet; add a support image with its object marked, or load a saved concept")
    t0 = time.perf_counter()
    ctx = model.prepare(list(supports))
    seconds = time.perf_counter() - t0
    path = ctx.save(Path(out_dir) / f"concept_{_safe_stem(ctx.method)}.safetensors")
    return ctx, path, seconds


def load_concept(path: str | Path | None, methods: Sequence[str]) -> Context:
    """A concept file saved by the app or ``Context.save``; its method must be one of ``methods``."""
    if path is None:
        raise InputError("concept file: nothing uploaded; choose a .safetensors file saved by this app or Context.save")
    p = Path(path)
    ctx = Context.load(p)
    if ctx.method not in methods:
        raise InputError(
            f"concept file '{p.name}': prepared by method {ctx.method!r}, which this installation does not have "
            f"(methods: {', '.join(methods)}); load it where that method is installed"
        )
    return ctx


# ------------------------------------------------------------------------------------------------ queries
@dataclass
class QueryResult:
    """One segmented query.

    Attributes:
        name: the uploaded file's name.
        mask: (H, W) uint8 label map at the query's size.
        score: mean foreground probability inside the mask (None when nothing was found).
        seconds: wall time of segmenting this query.
        mask_path, overlay_path: PNGs written for download and display.
    """

    name: str
    mask: np.ndarray
    score: float | None
    seconds: float
    mask_path: Path
    overlay_path: Path

    @property
    def pixels(self) -> int:
        return int(((self.mask != 0) & (self.mask != 255)).sum())

    @property
    def area(self) -> float:
        return self.pixels / max(1, self.mask.size)

    def caption(self) -> str:
        score = "no object found" if self.score is None else f"score {self.score:.2f}"
        return f"{self.name} · {score} · {self.area * 100:.1f}% · {self.seconds * 1000:.0f} ms"

    def row(self) -> list[Any]:
        return [self.name, self.pixels, round(self.area * 100, 2),
                None if self.score is None else round(self.score, 3), round(self.seconds * 1000)]


RESULT_HEADERS = ["query", "object pixels", "area %", "score", "time (ms)"]


def _score(pred: Any) -> float | None:
    fg = (pred.mask != 0) & (pred.mask != 255)
    if not fg.any():
        return None
    vals = [pred.scores[int(c)][pred.mask == c] for c in np.unique(pred.mask[fg]) if int(c) in pred.scores]
    return float(np.concatenate(vals).mean()) if vals else None


def run_queries(
    model: Any,
    context: Context,
    queries: Sequence[tuple[str, np.ndarray]],
    out_dir: Path,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[QueryResult]:
    """Segment each (name, image) query against ``context``; write ``<name>_mask.png`` (0/1 or label values,
    palette PNG) and ``<name>_overlay.png`` into ``out_dir``.

    Args:
        progress: called as ``progress(done, total, name)`` before each query.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[QueryResult] = []
    used: set[str] = set()
    for i, (name, image) in enumerate(queries):
        if progress is not None:
            progress(i, len(queries), name)
        stem = _safe_stem(name)
        while stem in used:  # two uploads with one name must not overwrite each other's results
            stem = f"{stem}_{i}"
        used.add(stem)
        t0 = time.perf_counter()
        pred = model.segment(image, context)
        seconds = time.perf_counter() - t0
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        write_mask_png(mask_path, pred.mask)
        write_overlay_png(overlay_path, image, pred.mask)
        results.append(QueryResult(name, pred.mask, _score(pred), seconds, mask_path, overlay_path))
    if progress is not None:
        progress(len(queries), len(queries), "")
    return results


# ------------------------------------------------------------------------------------------------ previews
def write_support_preview(support: Support, path: Path) -> Path:
    """The support image with its mask tinted, for the supports gallery."""
    write_overlay_png(path, support.image, support.mask)
    return path


def draw_clicks(image: np.ndarray, mask: np.ndarray | None, clicks: Sequence[tuple[float, float, int]],
                path: Path) -> Path:
    """``image`` with ``mask`` tinted and each click drawn as a dot (green = object, red = background)."""
    from PIL import Image, ImageDraw

    m = np.zeros(image.shape[:2], np.uint8) if mask is None else mask.astype(np.uint8)
    write_overlay_png(path, image, m)
    im = Image.open(path).convert("RGB")
    draw = ImageDraw.Draw(im)
    r = max(3, min(image.shape[:2]) // 60)
    for x, y, lab in clicks:
        colour = (0, 200, 0) if lab == 1 else (230, 30, 30)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255))
    im.save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------------ prompt bank
class Banks:
    """Prompt-bank retrievers opened once per folder (reopened when the bank's current version changes)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._open: dict[str, tuple[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, folder: str | Path) -> Any:
        from incontext.retrieve import load_retriever

        if not folder or not str(folder).strip():
            raise InputError("bank folder: empty; type the path of a prompt bank folder (built with "
                             "`python -m incontext.bank build`)")
        p = Path(str(folder).strip()).expanduser().resolve()
        marker = p / "BANK.json"
        if not marker.is_file():
            raise InputError(f"bank folder: no prompt bank at {p} (no BANK.json); build one with "
                             "`python -m incontext.bank build <source> <bank_dir>`")
        version = marker.read_text(encoding="utf-8")
        with self._lock:
            hit = self._open.get(str(p))
            if hit is None or hit[0] != version:
                self._open[str(p)] = (version, load_retriever(p, device=self.device))
            return self._open[str(p)][1]


@dataclass
class BankHit:
    """A bank entry retrieved for a query: its class, scores, source file and the entry as a ``Support``."""

    cls: str
    score: float
    image_score: float
    object_score: float | None
    source: str
    support: Support

    def row(self, rank: int) -> list[Any]:
        obj = None if self.object_score is None else round(self.object_score, 3)
        return [rank, self.cls, round(self.score, 3), round(self.image_score, 3), obj, Path(self.source).name]


BANK_HEADERS = ["rank", "class", "score", "image score", "object score", "file"]
CONCEPT_HEADERS = ["class", "score", "examples"]


def bank_search(retriever: Any, image: np.ndarray, k: int, same_class: bool = True) -> list[BankHit]:
    """The ``k`` best bank entries for ``image``.

    Args:
        same_class: keep to the class the bank votes for (what the retrieve stage gives a method, so the hits
            can serve as supports of one concept); False = best entries of any class.
    """
    if int(k) < 1:
        raise InputError(f"k: {k}; ask for at least one example")
    qe = retriever.embed(image)
    classes = [retriever.vote_class(None, embedding=qe)] if same_class else None
    hits = retriever.search(None, int(k), classes=classes, embedding=qe)
    return [BankHit(h.cls, h.score, h.image_score, h.object_score, h.source,
                    retriever.bank.support(h.id, verify=retriever.verify_files)) for h in hits]


def bank_concepts(retriever: Any, image: np.ndarray, top: int) -> list[list[Any]]:
    """Rows (class, score, examples) of the bank's concepts ranked for ``image``, best first."""
    return [[c.cls, round(c.score, 3), c.entries] for c in retriever.rank_concepts(image, top=max(1, int(top)))]
