"""Owns model construction: registers mmkd's declarative open_clip configs and builds encoders from them."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import text_global_pool
from safetensors.torch import load_file, save

from mmkd.models.preprocess import OPENAI_MEAN, OPENAI_STD, ImageSpec, spec_from_open_clip
from mmkd import atomic

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_configs() -> None:
    """Make mmkd-* model configs visible to open_clip's factory (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def model_config(name: str) -> dict:
    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"unknown model config '{name}'; mmkd configs: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}")
    return cfg


class _NoPretrainedNotice(logging.Filter):
    """open_clip warns that no pretrained weights were loaded; for mmkd's own configs that is the intent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def input_size(name: str) -> int:
    """The square image size a registered config's vision tower takes."""
    size = model_config(name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def create_model(name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A randomly initialised open_clip CLIP from a registered config name (weights come from a checkpoint)."""
    model_config(name)
    root, notice = logging.getLogger(), _NoPretrainedNotice()
    root.addFilter(notice)
    try:
        model = open_clip.create_model(name, pretrained=None, device=device)
    finally:
        root.removeFilter(notice)
    return trim_text_context(model)


def trim_text_context(model: torch.nn.Module) -> torch.nn.Module:
    """Run the text tower only up to the batch's last end-of-text token.

    With a causal mask and pooling at the end-of-text token (open_clip's `argmax`), positions after the longest
    caption's end-of-text token reach no output, so cutting them gives the same features and gradients (to float
    rounding) for ~30% less text compute on the embedded corpora's captions (23 of 32 tokens per batch)."""
    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        return model  # another pooling, or bidirectional attention: every position counts
    model.encode_text = types.MethodType(_encode_text_trimmed, model)
    return model


def _encode_text_trimmed(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    n = int(text.argmax(dim=-1).max()) + 1  # the end-of-text token has the highest id (as text_global_pool assumes)
    text = text[:, :n]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type)
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def save_checkpoint(model: torch.nn.Module, folder: Path, model_name: str, extra: dict | None = None) -> Path:
    """Weights as safetensors plus a small JSON naming the config, so loading never unpickles."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic.write_bytes(folder / "model.safetensors", save(state))
    meta = {"model": model_name, **(extra or {})}
    atomic.write_json(folder / "model.json", meta, sort_keys=True)
    return folder / "model.safetensors"


def load_checkpoint(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder}: no model.json; not an mmkd checkpoint folder")
    meta = json.loads(meta_path.read_text())
    model = create_model(meta["model"], device=device)
    model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    model.eval()
    return model, meta


def image_spec(model: torch.nn.Module) -> ImageSpec:
    """An open_clip model's preprocessing, from its own preprocess_cfg (size, mean/std, interpolation, resize)."""
    visual = model.visual
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = visual.image_size
    cfg["size"] = size[0] if isinstance(size, (tuple, list)) else int(size)
    cfg.setdefault("mean", getattr(visual, "image_mean", None) or OPENAI_MEAN)
    cfg.setdefault("std", getattr(visual, "image_std", None) or OPENAI_STD)
    return spec_from_open_clip(cfg)


def to_tensor(images: np.ndarray, spec: ImageSpec, device, crops: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW at the model's size; crops (training.augment.draw_crops) crop first."""
    # np.array copies: batches sliced from a read-only memory-mapped shard cannot back a tensor; a tensor (the
    # training reader's pinned batch) goes as it is, asynchronously when pinned
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, dtype=np.uint8))
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    if crops is not None:
        from mmkd.training.augment import apply_crops

        x = apply_crops(x, crops, spec)
    elif x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        mode = "bicubic" if spec.interpolation == "bicubic" else spec.interpolation
        x = F.interpolate(x, size=(spec.size, spec.size), mode=mode,
                          **({} if mode == "nearest" else {"align_corners": False})).clamp(0, 1)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std
