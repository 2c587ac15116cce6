"""Owns training-time augmentation: RandomResizedCrop boxes drawn as torchvision draws them, resampled as eval does.

Boxes are drawn for the whole global batch from the loop's seeded generator (so every rank, and a resumed run,
draws the same ones) and applied to this rank's rows in one batched `grid_sample`, with the interpolation the
model's evaluation preprocessing uses (bicubic for CLIP), so training and evaluation see the same resampling.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mmkd.models.preprocess import ImageSpec

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a centre crop


def draw_crops(n: int, generator: torch.Generator, scale: tuple[float, float] = (0.9, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """[n, 4] boxes (w, h, cx, cy) in the unit square's [-1, 1] grid coordinates, w and h as fractions of the side.

    Like torchvision: area ~ U(scale), log aspect ~ U(log ratio); a box that does not fit is redrawn (never
    clamped, which would shrink the area and distort the aspect), up to 10 times, then the whole image is used.
    A fixed number of draws per batch keeps the generator's stream independent of which attempts succeed.
    """
    area = torch.empty(n, ATTEMPTS).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(n, ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    pos = torch.rand(n, ATTEMPTS, 2, generator=generator)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= 1.0) & (h <= 1.0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    bw, bh = w[rows, pick], h[rows, pick]
    # the box's offset inside the image, uniform over the positions where it fits, as grid centres
    cx = (pos[rows, pick, 0] * 2 - 1) * (1 - bw)
    cy = (pos[rows, pick, 1] * 2 - 1) * (1 - bh)
    boxes = torch.stack([bw, bh, cx, cy], 1)
    boxes[first < 0] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    return boxes


def apply_crops(x: torch.Tensor, boxes: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Crop each image of x [n, C, H, W] (floats in [0, 1]) to its box and resample it to spec.size."""
    n = len(x)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = boxes[:, 0], boxes[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = boxes[:, 2], boxes[:, 3]
    grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], spec.size, spec.size], align_corners=False)
    mode = "bicubic" if spec.interpolation == "bicubic" else ("nearest" if spec.interpolation == "nearest" else "bilinear")
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0, 1)  # bicubic overshoots, as in evaluation's resize


def crop_area_fraction(boxes: torch.Tensor) -> np.ndarray:
    return (boxes[:, 0] * boxes[:, 1]).numpy()
