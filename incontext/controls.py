"""Support-free baselines: controls that show how much of a benchmark can be solved without the supports.

Both are ``Segmenter``s that accept supports (so they run through the same evaluation) and ignore them:

* ``SalientObject(mode="contrast")``: the most salient object. Dense colour + texture features (the offline
  ``HandcraftedFeatures``), standardised per image; a cell's saliency is its distance to the nearest of a few
  k-means prototypes of the image border (boundary prior: what touches the border is background), times a
  centred Gaussian prior. The mask is the connected component above the saliency threshold (mean + 1 std) with
  the highest mean saliency.
* ``SalientObject(mode="centre")``: the centre prior alone, a centred disc of ``centre_area`` of the image.

A benchmark that needs its supports keeps these well below a support-using method (the procedural benchmark's
target: at most half of ``prototype``'s mIoU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from incontext.episode import Support
from incontext.errors import InputError
from incontext.pipeline import BinaryResult, Segmenter, resize_map

MODES = ("contrast", "centre")


def _kmeans(x: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """Euclidean k-means of rows of ``x`` (N, C) from a fixed farthest-point start; returns (k', C)."""
    k = min(k, x.shape[0])
    centres = [x.mean(0)]
    for _ in range(k - 1):
        d = torch.cdist(x, torch.stack(centres)).min(1).values
        centres.append(x[int(d.argmax())])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(len(c)):
            if (assign == j).any():
                c[j] = x[assign == j].mean(0)
    return c


class SalientObject(Segmenter):
    """Support-free control (see the module docstring).

    Args:
        mode: "contrast" (border-contrast saliency, the most salient component) or "centre" (centre disc).
        features: a dense feature extractor for "contrast" (default: ``HandcraftedFeatures(224, 4)``).
        border_prototypes: k-means prototypes of the border cells.
        centre_sigma: std of the Gaussian centre prior, as a fraction of the image side.
        centre_area: area of the centre disc (fraction of the image) in "centre" mode.
        name, device: see ``Segmenter``.
    """

    def __init__(self, mode: str = "contrast", features=None, border_prototypes: int = 6,
                 centre_sigma: float = 0.3, centre_area: float = 0.1, name: str = "salient",
                 device: str = "cpu") -> None:
        super().__init__(name=name, device=device)
        if mode not in MODES:
            raise InputError(f"method.mode: {mode!r}; pass one of {', '.join(MODES)}")
        if features is None and mode == "contrast":
            from incontext.features import HandcraftedFeatures

            features = HandcraftedFeatures(size=224, stride=4)
        self.mode = mode
        self.features = features
        self.border_prototypes = int(border_prototypes)
        self.centre_sigma = float(centre_sigma)
        self.centre_area = float(centre_area)

    def prepare_binary(self, supports: list[Support]) -> dict:
        return {}  # support-free by design

    def _centre(self, h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        return np.hypot((yy + 0.5) / h - 0.5, (xx + 0.5) / w - 0.5)

    def segment_binary(self, query: np.ndarray, state: dict, *, cache: dict) -> BinaryResult:
        h, w = query.shape[:2]
        if self.mode == "centre":
            r = self._centre(h, w)
            mask = r <= np.sqrt(self.centre_area / np.pi)
            return BinaryResult(prob=mask.astype(np.float32), mask=mask)
        f = self.features(query).float()
        c, gh, gw = f.shape
        x = f.flatten(1).T
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
        border = torch.zeros(gh, gw, dtype=torch.bool)
        border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
        protos = _kmeans(x[border.flatten()], self.border_prototypes)
        sal = torch.cdist(x, protos).min(1).values.view(gh, gw)
        prior = torch.from_numpy(np.exp(-self._centre(gh, gw) ** 2 / (2 * self.centre_sigma ** 2)))
        sal = sal * prior
        sal = (sal - sal.min()) / (sal.max() - sal.min() + 1e-6)
        prob = resize_map(sal, (h, w)).clamp(0, 1).numpy()
        fg = prob > prob.mean() + prob.std()
        labels, n = ndimage.label(fg)
        if n == 0:
            return BinaryResult(prob=prob, mask=fg)
        idx = np.arange(1, n + 1)
        areas = ndimage.sum_labels(fg, labels, idx)
        means = ndimage.mean(prob, labels, idx)
        means[areas < 0.002 * h * w] = -1.0  # specks are not objects
        best = int(idx[int(np.argmax(means))])
        return BinaryResult(prob=prob, mask=labels == best, extras={"components": int(n)})
