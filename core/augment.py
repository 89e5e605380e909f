"""Augment batches, not files: one affine warp per batch on the training device, as fastai's batch transforms do.

Images reach the model as uint8 squares presized once (`presize`: shorter side to `presize_side(size)`,
centre crop). Training batches then get a random resized crop, flips, 90-degree turns, a small rotation
(all folded into one affine matrix per image and applied with a single `grid_sample`) and lighting;
validation and prediction batches are resized to `size`. The CPU only decodes and feeds bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESIZE_RATIO = 1.15  # a little above the training size, so random crops keep detail and edges
PRESIZE_VERSION = 2  # part of the decode cache's key: raise it whenever `presize` gives other pixels


def presize_side(size: int) -> int:
    return int(math.ceil(size * PRESIZE_RATIO))


def presize(img: Image.Image, side: int) -> np.ndarray:
    """RGB PIL image -> uint8 array [3, side, side]: the centre square, resized to `side`."""
    square = ImageOps.fit(img, (side, side), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


@dataclass(frozen=True)
class BatchAugment:
    """The random part of training augmentation, for a whole uint8 batch on any device."""

    size: int
    min_scale: float = 0.35
    flip: bool = True
    flip_vert: bool = False
    max_rotate: float = 10.0
    max_lighting: float = 0.2

    @classmethod
    def from_config(cls, cfg) -> BatchAugment:
        """From a core.data.DataConfig (not imported here: core.data builds on this module)."""
        return cls(cfg.size, cfg.min_scale, cfg.flip, cfg.flip_vert, cfg.max_rotate, cfg.max_lighting)

    def affine(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, 2, 3] matrices mapping output to input coordinates (affine_grid's convention)."""
        u = lambda: torch.rand(n, generator=generator)  # noqa: E731
        area = self.min_scale + (1 - self.min_scale) * u()
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u()
        ratio = torch.exp(log_ratio)
        half_w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop half-extent in [-1, 1] coordinates
        half_h = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (2 * u() - 1) * (1 - half_w)
        ty = (2 * u() - 1) * (1 - half_h)
        angle = (2 * u() - 1) * math.radians(self.max_rotate)
        if self.flip_vert:
            angle = angle + torch.randint(0, 4, (n,), generator=generator) * (math.pi / 2)
            half_h = torch.where(u() < 0.5, -half_h, half_h)
        if self.flip:
            half_w = torch.where(u() < 0.5, -half_w, half_w)
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack(
            [torch.stack([half_w * cos, -half_h * sin, tx], 1), torch.stack([half_w * sin, half_h * cos, ty], 1)], 1
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> float [B, 3, size, size] in [0, 1], augmented."""
        n = x.shape[0]
        theta = self.affine(n, generator).to(x.device)
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        out = F.grid_sample(x.float() / 255.0, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.max_lighting > 0:
            out = self._lighting(out, generator)
        return out

    def _lighting(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, span = x.shape[0], self.max_lighting
        brightness = (1 + (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1) * span).to(x.device)
        contrast = (1 + (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1) * span).to(x.device)
        grey = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - grey) * contrast + grey * brightness).clamp(0, 1)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [B, 3, size, size] in [0, 1]: the deterministic path (valid, predict)."""
    x = x.float() / 255.0
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
