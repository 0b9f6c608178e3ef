"""Segmenters: the two-phase interface (prepare once, segment many) and the staged Pipeline.

A ``Segmenter`` answers one question for binary episodes — where is the concept of these 0/1 support masks in
this query? — through two methods a subclass implements:

* ``prepare_binary(supports) -> state``: everything that depends only on the supports (features, prototypes,
  fitted weights). Values are tensors (saved with safetensors) or JSON-able settings.
* ``segment_binary(query, state, cache=...) -> BinaryResult``: one query, one class. ``cache`` is a dict private
  to this query and shared by every class or concept segmented on it, so a query's encoder passes are paid once.

The base class turns these into the public API: multi-class episodes run once per class and merge (highest
probability wins), contexts save and load, several saved concepts run on one query, and a retriever can fill
missing supports.

``Pipeline`` is the Segmenter that most methods are: a chain of stages

    retrieve → match → generate → refine → Prediction

where each stage reads and writes a ``Carry`` (the per-query blackboard): ``match`` leaves a ``prior`` (and
possibly ``points``), ``generate`` a ``prob`` map, ``refine`` a final ``mask`` and ``instances``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from incontext.episode import Context, Instance, Prediction, Support, as_supports
from incontext.errors import InputError

State = dict[str, Any]


@dataclass
class BinaryResult:
    """One class on one query.

    Attributes:
        prob: (H, W) float32 foreground probability in [0, 1], query's original size.
        mask: (H, W) bool decision; defaults to ``prob > 0.5``.
        instances: selected instance masks (original size) with scores.
        extras: named diagnostics.
    """

    prob: np.ndarray
    mask: np.ndarray | None = None
    instances: list[Instance] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask is None:
            self.mask = self.prob > 0.5


@runtime_checkable
class Retriever(Protocol):
    """Chooses supports for a query from a bank."""

    def retrieve(self, query: np.ndarray, supports: Sequence[Support], k: int) -> list[Support]:
        """Return ``k`` more supports for ``query`` (never the query itself), given those already chosen."""
        ...


class Segmenter:
    """Base class of every method. See the module docstring.

    Args:
        name: the method's registry name (recorded in contexts).
        device: "cpu", "cuda", "cuda:1", ...; models follow it.
        retriever: optional; fills supports from a bank when an episode has fewer than ``shots``.
        shots: how many supports to aim for when retrieving (0 = never retrieve beyond what was given).
    """

    def __init__(
        self,
        name: str = "",
        device: str | torch.device = "cpu",
        retriever: Retriever | None = None,
        shots: int = 0,
    ) -> None:
        self.name = name or type(self).__name__.lower()
        self.device = torch.device(device)
        self.retriever = retriever
        self.shots = int(shots)

    # ---------------------------------------------------------------- to implement
    def prepare_binary(self, supports: list[Support]) -> State:
        """Support-only state for one class; ``supports`` carry 0/1 masks."""
        raise NotImplementedError

    def segment_binary(self, query: np.ndarray, state: State, *, cache: dict) -> BinaryResult:
        """Segment one class of ``query`` ((H, W, 3) uint8) from its prepared ``state``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- public API
    def prepare(self, supports: Iterable[Any], resize_masks: bool = False) -> Context:
        """Encode the supports once. Multi-class masks give one state per class.

        Args:
            supports: ``Support`` objects or (image, mask) pairs.
            resize_masks: forwarded to ``Support``.
        """
        sup = as_supports(supports, resize_masks)
        if not sup:
            raise InputError(
                "supports: none given; pass at least one (image, mask) pair, or configure a "
                "prompt bank (bank=...) so supports can be retrieved"
            )
        classes = sorted({c for s in sup for c in s.classes})
        if not classes:
            raise InputError("supports: every support mask is empty; mark the object in at least one mask")
        tensors: dict[str, torch.Tensor] = {}
        settings: dict[str, Any] = {}
        with torch.inference_mode():
            for c in classes:
                # A support whose mask lacks this class still counts as a negative example only for
                # methods that use backgrounds; positive-only methods get the supports that show it.
                members = [s.binary(c) for s in sup if c in s.classes]
                for key, value in self.prepare_binary(members).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"c{c}.{key}"] = value.detach().to("cpu")
                    else:
                        settings.setdefault(str(c), {})[key] = value
        meta = {"classes": classes, "shots": len(sup), "state": settings, "supports": [s.name for s in sup]}
        return Context(self.name, tensors, meta)

    def segment(
        self,
        query: Any,
        supports: Context | Iterable[Any] | None = None,
        resize_masks: bool = False,
    ) -> Prediction:
        """Segment ``query`` given a prepared ``Context`` or raw supports (prepared on the fly).

        With a retriever configured, missing supports (fewer than ``shots``) are retrieved first.
        """
        from incontext.io import read_image

        q = read_image(query, name="query")
        if isinstance(supports, Context):
            return self._segment_contexts(q, [supports], multi_concept=False)
        sup = as_supports(supports, resize_masks)
        t0 = time.perf_counter()
        retrieved = 0
        if self.retriever is not None and len(sup) < max(self.shots, 1):
            extra = self.retriever.retrieve(q, sup, max(self.shots, 1) - len(sup))
            retrieved = len(extra)
            sup = sup + list(extra)
        ctx = self.prepare(sup)
        t_prep = time.perf_counter() - t0
        pred = self._segment_contexts(q, [ctx], multi_concept=False)
        pred.extras.setdefault("timings", {})["prepare_s"] = t_prep
        if retrieved:
            pred.extras["retrieved_supports"] = [s.name for s in sup[-retrieved:]]
        return pred

    def segment_many(self, queries: Iterable[Any], context: Context) -> Iterator[Prediction]:
        """Segment many queries against one prepared context (each query's encoders run once)."""
        from incontext.io import read_image

        for i, q in enumerate(queries):
            yield self._segment_contexts(read_image(q, name=f"queries[{i}]"), [context], False)

    def segment_concepts(self, query: Any, contexts: Sequence[Context]) -> Prediction:
        """Find several saved concepts in one query: concept i gets label i + 1 (highest probability wins).

        The query's encoder passes are shared by every concept.
        """
        from incontext.io import read_image

        if not contexts:
            raise InputError("contexts: empty; pass at least one prepared Context")
        return self._segment_contexts(read_image(query, name="query"), list(contexts), multi_concept=True)

    def to(self, device: str | torch.device) -> "Segmenter":
        """Move models to ``device``; subclasses with modules extend this."""
        self.device = torch.device(device)
        return self

    # ---------------------------------------------------------------- internals
    def _check_context(self, ctx: Context) -> None:
        if ctx.method != self.name:
            raise InputError(
                f"context: prepared by method {ctx.method!r} but this is {self.name!r}; "
                f"build({ctx.method!r}) to use it, or prepare the supports again with this method"
            )

    def _state(self, ctx: Context, c: int) -> State:
        state: State = {k: v.to(self.device) for k, v in ctx.subset(f"c{c}.").items()}
        state.update(ctx.meta.get("state", {}).get(str(c), {}))
        return state

    def _segment_contexts(
        self, query: np.ndarray, contexts: list[Context], multi_concept: bool
    ) -> Prediction:
        cache: dict = {}
        results: list[tuple[int, BinaryResult]] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i, ctx in enumerate(contexts):
                self._check_context(ctx)
                for c in ctx.meta["classes"]:
                    label = i + 1 if multi_concept else int(c)
                    res = self.segment_binary(query, self._state(ctx, int(c)), cache=cache)
                    results.append((label, res))
        pred = merge_results(query.shape[:2], results)
        pred.extras.setdefault("timings", {})["segment_s"] = time.perf_counter() - t0
        return pred


def merge_results(size: tuple[int, int], results: list[tuple[int, BinaryResult]]) -> Prediction:
    """Merge per-class results into one label map: where several classes claim a pixel, the highest
    probability wins; a pixel no class claims is background."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    best = np.full((h, w), -1.0, np.float32)
    scores: dict[int, np.ndarray] = {}
    instances: list[Instance] = []
    extras: dict[str, Any] = {}
    for label, res in results:
        if res.prob.shape != (h, w) or res.mask.shape != (h, w):
            raise AssertionError(f"class {label}: result is {res.prob.shape}, query is {(h, w)}")
        claim = res.mask & (res.prob > best)
        mask[claim] = label
        best[claim] = res.prob[claim]
        scores[label] = res.prob.astype(np.float32, copy=False)
        for inst in res.instances:
            inst.label = label
            instances.append(inst)
        if len(results) == 1:
            extras.update(res.extras)
        else:
            extras[f"class_{label}"] = res.extras
    return Prediction(mask=mask, scores=scores, instances=instances, extras=extras)


# ==================================================================== staged pipeline
@dataclass
class Carry:
    """The per-query blackboard that stages read and write.

    Attributes:
        query: (H, W, 3) uint8, original size.
        cache: per-query dict shared across classes/concepts (encoder outputs).
        prior: (h, w) float tensor in [0, 1]: where the concept likely is (match stages), any resolution.
        points: (N, 2) float tensor, xy in original query pixels; ``point_labels`` (N,) 1/0.
        prob: (H, W) float tensor in [0, 1] at the query's size (generate stages).
        mask: (H, W) bool tensor, final decision (refine stages).
        instances: selected instances.
        extras: named diagnostics; each stage adds ``stage_scores[stage]``.
    """

    query: np.ndarray
    cache: dict
    prior: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    prob: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    instances: list[Instance] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Stage(Protocol):
    """A match, generate or refine stage of a ``Pipeline``."""

    def prepare(self, supports: list[Support]) -> State:
        """Support-only state (tensors or JSON-able values)."""
        ...

    def __call__(self, carry: Carry, state: State) -> None:
        """Read what earlier stages left in ``carry`` and write this stage's outputs."""
        ...


STAGES = ("match", "generate", "refine")


class Pipeline(Segmenter):
    """A method made of stages: ``match`` → ``generate`` → ``refine`` (any may be None), plus the
    Segmenter's optional retriever.

    Args:
        match, generate, refine: stage objects (see ``Stage``).
        threshold: probability above which a pixel is foreground when no stage decides the mask.
        (others): see ``Segmenter``.
    """

    def __init__(
        self,
        name: str = "",
        device: str | torch.device = "cpu",
        retriever: Retriever | None = None,
        shots: int = 0,
        match: Stage | None = None,
        generate: Stage | None = None,
        refine: Stage | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(name=name, device=device, retriever=retriever, shots=shots)
        self.stages = {k: s for k, s in (("match", match), ("generate", generate), ("refine", refine)) if s}
        if not self.stages:
            raise InputError(f"method {self.name!r}: no stage configured; set match, generate or refine")
        self.threshold = float(threshold)
        self.to(self.device)

    def to(self, device: str | torch.device) -> "Pipeline":
        super().to(device)
        for stage in self.stages.values():
            if hasattr(stage, "to"):
                stage.to(self.device)
        return self

    def prepare_binary(self, supports: list[Support]) -> State:
        state: State = {}
        for sname, stage in self.stages.items():
            for key, value in stage.prepare(supports).items():
                state[f"{sname}.{key}"] = value
        return state

    def segment_binary(self, query: np.ndarray, state: State, *, cache: dict) -> BinaryResult:
        carry = Carry(query=query, cache=cache)
        timings: dict[str, float] = {}
        for sname, stage in self.stages.items():
            t0 = time.perf_counter()
            sub = {k[len(sname) + 1 :]: v for k, v in state.items() if k.startswith(sname + ".")}
            stage(carry, sub)
            timings[sname] = time.perf_counter() - t0
        h, w = query.shape[:2]
        prob = carry.prob
        if prob is None and carry.prior is not None:
            prob = resize_map(carry.prior, (h, w))
        if prob is None and carry.mask is not None:
            prob = carry.mask.float()
        if prob is None:
            raise AssertionError(f"method {self.name!r}: no stage produced a prior, prob or mask")
        mask = carry.mask if carry.mask is not None else prob > self.threshold
        extras = dict(carry.extras)
        extras["stages"] = list(self.stages)
        extras.setdefault("timings", {}).update({f"{k}_s": v for k, v in timings.items()})
        if carry.points is not None:
            extras["points"] = carry.points.detach().cpu().numpy()
            if carry.point_labels is not None:
                extras["point_labels"] = carry.point_labels.detach().cpu().numpy()
        return BinaryResult(
            prob=prob.detach().float().cpu().numpy(),
            mask=mask.detach().bool().cpu().numpy(),
            instances=carry.instances,
            extras=extras,
        )


def resize_map(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (h, w) map to ``size`` = (H, W) (bilinear, corners not aligned)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x[None, None].float(), size=size, mode=mode, **kwargs)[0, 0]
