"""Owns the drawing primitives the renderers share: coordinate grid, soft shapes, noise, the sensor finish to uint8."""

from __future__ import annotations

import numpy as np
from PIL import Image


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1]: (yy, xx)."""
    ax = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(ax, ax, indexing="ij")


def ellipse(yy, xx, cy, cx, ry, rx, soft=0.04, angle=0.0):
    """Soft-edged filled ellipse mask in [0, 1]."""
    y, x = yy - cy, xx - cx
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        x, y = c * x + s * y, -s * x + c * y
    d = np.sqrt((y / ry) ** 2 + (x / rx) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / max(soft, 1e-3), -50, 50)))


def smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: random cells x cells field, bilinearly upsampled."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR))


def blobs(yy, xx, centers, radii, soft=0.25):
    """Sum of gaussian blobs; centers (N,2) as (cy,cx), radii (N,)."""
    if len(centers) == 0:
        return np.zeros_like(yy)
    cy = centers[:, 0][:, None, None]
    cx = centers[:, 1][:, None, None]
    r = np.asarray(radii, dtype=np.float32)[:, None, None]
    d2 = ((yy[None] - cy) ** 2 + (xx[None] - cx) ** 2) / (r**2)
    return np.clip(np.exp(-(d2**2) * (1.0 / soft)).sum(0), 0, 1)


def to_rgb(gray: np.ndarray, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    g = np.clip(gray, 0, 1)
    return np.stack([g * tint[0], g * tint[1], g * tint[2]], -1)


def finish(rgb: np.ndarray, rng, noise: float, controls: dict | None = None, seen: dict | None = None) -> np.ndarray:
    """Global exposure jitter plus sensor noise, to uint8; `controls` may fix gain and bias (the suite's exposure
    and black level), `seen` receives the values used (for the caption)."""
    controls = controls or {}
    gain = controls.get("gain", rng.uniform(0.85, 1.15))
    bias = controls.get("bias", rng.uniform(-0.05, 0.05))
    if seen is not None:
        seen.update(gain=float(gain), bias=float(bias))
    out = rgb * gain + bias + rng.normal(0, noise, rgb.shape)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
