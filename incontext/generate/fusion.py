"""``generate=fuse``: run several generate stages on the same query and fuse their probability maps.

Each member (e.g. the diffusion generator and the painter) sees its own copy of the pipeline's ``Carry`` as the
match stage left it (so a generator that reads the match prior gets it) and writes a probability map at the
query's size. The fused map is a weighted mean of the members' maps, optionally with the match stage's own map
as one more member (name ``"match"``). Weights are data (the preset's YAML): equal by default, or fitted on the
*training* classes with ``benchmarks/fit_fusion_weights.py`` so the test classes never choose them.

What each member said is kept per query in ``carry.extras["generators"][name]``: its weight, foreground
fraction, mean probability inside its own foreground (confidence) and IoU with the fused decision
(agreement), so a user sees which generator carried the answer. ``carry.extras["uncertainty"]`` is the binary
entropy of the fused map.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np
import torch

from incontext.episode import Support
from incontext.errors import InputError
from incontext.pipeline import Carry, State, resize_map

__all__ = ["FuseGenerators", "MATCH_MEMBER"]

MATCH_MEMBER = "match"  # weight key for the match stage's own probability map


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


class FuseGenerators:
    """The ``generate`` stage that fuses several generators (see the module docstring).

    Args:
        generators: name -> generate stage (anything with ``prepare(supports)`` and ``__call__(carry, state)``
            that sets ``carry.prob``). Names must not contain dots and must not be ``"match"``.
        weights: name -> non-negative weight (normalised to sum 1 over the members present); missing names get
            weight 1 (equal weights when None). A ``"match"`` entry adds the match stage's probability map as a
            member (``carry.prob`` as the match stage left it, else its ``prior`` resized).
        threshold: foreground threshold used for the per-member diagnostics (the pipeline decides the mask).
        hflip: also run every generator on the mirrored query (and mirrored prior) and average the two maps
            (test-time augmentation; twice the generators' query cost, supports encoded once).
    """

    def __init__(self, generators: Mapping[str, Any], weights: Mapping[str, float] | None = None,
                 threshold: float = 0.5, hflip: bool = False) -> None:
        if not generators:
            raise InputError("generate.generators: empty; give at least one generate stage to fuse")
        for name in generators:
            if "." in name or name == MATCH_MEMBER:
                raise InputError(f"generate.generators: member name {name!r} is reserved or has a dot; rename it")
        self.generators = dict(generators)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.generators) - {MATCH_MEMBER}
        if unknown:
            raise InputError(f"generate.weights: {sorted(unknown)} are not members "
                             f"({', '.join(sorted(self.generators))}, or {MATCH_MEMBER!r})")
        if any(float(w) < 0 for w in weights.values()):
            raise InputError(f"generate.weights: {weights}; weights must be >= 0")
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.generators}
        if MATCH_MEMBER in weights and float(weights[MATCH_MEMBER]) > 0:
            self.weights[MATCH_MEMBER] = float(weights[MATCH_MEMBER])
        if sum(self.weights.values()) <= 0:
            raise InputError(f"generate.weights: {weights}; at least one weight must be positive")
        self.threshold = float(threshold)
        self.hflip = bool(hflip)

    def to(self, device: str | torch.device) -> "FuseGenerators":
        for g in self.generators.values():
            if hasattr(g, "to"):
                g.to(device)
        return self

    def prepare(self, supports: list[Support]) -> State:
        state: State = {}
        for name, g in self.generators.items():
            if self.weights.get(name, 0.0) <= 0:
                continue  # a zero-weight member is not run, so its supports need not be encoded
            for key, value in g.prepare(supports).items():
                state[f"{name}.{key}"] = value
        return state

    def member_maps(self, carry: Carry, state: State) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every member's probability map at the query's size (name -> (H, W) tensor) and their extras."""
        h, w = carry.query.shape[:2]
        probs: dict[str, torch.Tensor] = {}
        extras: dict[str, Any] = {}
        if MATCH_MEMBER in self.weights:
            if carry.prob is not None:
                probs[MATCH_MEMBER] = carry.prob.float()
            elif carry.prior is not None:
                probs[MATCH_MEMBER] = resize_map(carry.prior.float(), (h, w)).clamp(0, 1)
            else:
                raise InputError("generate.weights has a 'match' member but no match stage ran; add one or drop it")
        views = [(carry, False)]
        if self.hflip:
            # the mirrored query gets its own cache (encoder outputs are keyed by size, not by pixels)
            flip_cache = carry.cache.setdefault("fuse.hflip", {})
            views.append((replace(carry, query=np.ascontiguousarray(carry.query[:, ::-1]), cache=flip_cache,
                                  prior=None if carry.prior is None else carry.prior.flip(-1),
                                  prob=None if carry.prob is None else carry.prob.flip(-1), mask=None), True))
        for name, g in self.generators.items():
            if self.weights[name] <= 0:
                continue
            sub_state = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            maps = []
            for view, flipped in views:
                sub = replace(view, extras={}, instances=list(view.instances))
                g(sub, sub_state)
                if sub.prob is None:
                    raise AssertionError(f"generate member {name!r} set no prob")
                p = resize_map(sub.prob.float(), (h, w)).clamp(0, 1)
                maps.append(p.flip(-1) if flipped else p)
                if not flipped:
                    for k, v in sub.extras.items():
                        if k != "stage_scores":
                            extras[k] = v  # e.g. the painter's painted cell; later members win on a clash
            probs[name] = maps[0] if len(maps) == 1 else sum(maps) / len(maps)
        return probs, extras

    def __call__(self, carry: Carry, state: State) -> None:
        """Set ``carry.prob`` to the fused map (query size), clear ``carry.mask``, record per-member scores."""
        probs, extras = self.member_maps(carry, state)
        total = sum(self.weights[n] for n in probs)
        device = next(iter(probs.values())).device
        fused = sum((self.weights[n] / total) * p.to(device) for n, p in probs.items())
        fused = fused.clamp(0, 1)
        decision = fused > self.threshold
        report: dict[str, dict[str, float]] = {}
        for n, p in probs.items():
            m = p > self.threshold
            union = (m | decision).sum().item()
            report[n] = {
                "weight": round(self.weights[n] / total, 4),
                "fg_fraction": float(m.float().mean()),
                "confidence": float(p[m].mean()) if m.any() else 0.0,
                "agreement": float((m & decision).sum().item() / union) if union else 1.0,
            }
        carry.extras.update(extras)
        carry.extras["generators"] = report
        carry.extras["uncertainty"] = _binary_entropy(fused).cpu().numpy().astype(np.float32)
        carry.extras.setdefault("stage_scores", {})["generate"] = float(fused.max())
        carry.prob = fused
        carry.mask = None
