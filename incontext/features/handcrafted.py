"""Colour and local-texture features that need no downloaded weights.

The offline default feature extractor: it lets the training-free ``prototype`` baseline and retrieval run on a
fresh machine. Per pixel of a working-resolution copy of the image it stacks

* CIELAB colour, smoothed at two scales (what the object is painted with);
* structure-tensor energies (gx², gy², gx·gy) at two derivative scales, pooled locally (orientation and
  frequency of stripes, edges, checks);
* local luminance contrast and Laplacian-of-Gaussian magnitude at two scales (dots, noise, blobs);

then average-pools to a grid of ``stride`` pixels. Channels are square-root compressed where they are energies so
one strong edge does not dominate. Standardisation is left to the user of the features (the prototype matcher
standardises with the supports' statistics), so the same extractor serves every episode.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


class HandcraftedFeatures:
    """Dense colour + texture features.

    Args:
        size: the image's longer side is resized to this many pixels before filtering.
        stride: grid cell size in working pixels; output is about (size / stride) cells on the longer side.
        device: where the returned tensor lives.
    """

    def __init__(self, size: int = 224, stride: int = 4, device: str | torch.device = "cpu") -> None:
        self.size = int(size)
        self.stride = int(stride)
        self.device = torch.device(device)
        self.name = f"handcrafted(size={self.size},stride={self.stride})"

    def to(self, device: str | torch.device) -> "HandcraftedFeatures":
        self.device = torch.device(device)
        return self

    @property
    def dim(self) -> int:
        return 6 + 10 + 4

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (C, h, w) float32."""
        h, w = image.shape[:2]
        scale = self.size / max(h, w)
        wh = (max(self.stride, round(w * scale)), max(self.stride, round(h * scale)))
        img = cv2.resize(image, wh, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32)
        # OpenCV's 8-bit Lab is L*255/100 and a,b offset by 128; bring to roughly unit ranges.
        lab = (lab - np.array([128.0, 128.0, 128.0], np.float32)) / 64.0
        lum = lab[..., 0]
        chans: list[np.ndarray] = []
        for sigma in (1.0, 3.0):
            chans.extend(np.moveaxis(cv2.GaussianBlur(lab, (0, 0), sigma), -1, 0))
        for dsigma, psigma in ((1.0, 3.0), (2.0, 6.0)):
            smooth = cv2.GaussianBlur(lum, (0, 0), dsigma)
            gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
            gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
            for e in (gx * gx, gy * gy, gx * gy):
                pooled = cv2.GaussianBlur(e, (0, 0), psigma)
                chans.append(np.sign(pooled) * np.sqrt(np.abs(pooled)))
            # Doubled-angle orientation energy makes 0 and 180 degrees the same texture.
            for e in (gx * gx - gy * gy, 2 * gx * gy):
                pooled = cv2.GaussianBlur(e, (0, 0), psigma)
                chans.append(np.sign(pooled) * np.sqrt(np.abs(pooled)))
        for sigma in (2.0, 5.0):
            mean = cv2.GaussianBlur(lum, (0, 0), sigma)
            var = cv2.GaussianBlur(lum * lum, (0, 0), sigma) - mean * mean
            chans.append(np.sqrt(np.maximum(var, 0.0)))
            log = cv2.Laplacian(cv2.GaussianBlur(lum, (0, 0), sigma / 2), cv2.CV_32F)
            chans.append(np.sqrt(cv2.GaussianBlur(np.abs(log), (0, 0), sigma)))
        feat = np.stack(chans, 0)
        gh, gw = max(1, feat.shape[1] // self.stride), max(1, feat.shape[2] // self.stride)
        t = torch.from_numpy(np.ascontiguousarray(feat))[None]
        t = torch.nn.functional.adaptive_avg_pool2d(t, (gh, gw))[0]
        return t.to(self.device)
