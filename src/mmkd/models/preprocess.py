"""Owns image preprocessing specs: a model's size, mean/std, interpolation and resize mode, and applying them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class ImageSpec:
    """What a vision tower expects: a square `size` image, normalised with mean/std."""

    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest (resize short side + centre crop), longest (fit + pad), squash
    fill: int = 0

    def with_overrides(self, cfg) -> "ImageSpec":
        """Apply a params.yaml `preprocess` block (unset fields keep the model's own values)."""
        given = {k: v for k, v in cfg.model_dump().items() if v is not None}
        return replace(self, **{k: tuple(v) if k in ("mean", "std") else v for k, v in given.items()})

    def as_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


def spec_from_open_clip(cfg: dict) -> ImageSpec:
    """From open_clip's preprocess_cfg (model.visual.preprocess_cfg or open_clip_config.json's preprocess_cfg)."""
    size = cfg.get("size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return ImageSpec(size, tuple(cfg.get("mean") or OPENAI_MEAN), tuple(cfg.get("std") or OPENAI_STD),
                     cfg.get("interpolation") or "bicubic", cfg.get("resize_mode") or "shortest",
                     int(cfg.get("fill_color") or 0))


def prepare(image: Image.Image | np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Any RGB image -> uint8 [size, size, 3] by the spec's resize mode and interpolation (PIL, as torchvision)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    s, resample = spec.size, _PIL[spec.interpolation]
    if (w, h) == (s, s):
        return np.asarray(im, dtype=np.uint8)
    if spec.resize_mode == "squash":
        return np.asarray(im.resize((s, s), resample), dtype=np.uint8)
    if spec.resize_mode == "longest":
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (s, s), (spec.fill,) * 3)
        canvas.paste(im.resize((nw, nh), resample), ((s - nw) // 2, (s - nh) // 2))
        return np.asarray(canvas, dtype=np.uint8)
    # shortest: torchvision Resize(int) + CenterCrop, as open_clip and CLIP preprocess
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    im = im.resize((nw, nh), resample)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    return np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.uint8)
