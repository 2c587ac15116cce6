"""Owns CLIP-style contrastive training of one open_clip model on curated pairs (teachers and stage 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch

from mmkd.config import TrainCfg
from mmkd.models.factory import create_model, save_checkpoint
from mmkd.training.loop import tokenize_all, train
from mmkd.training.losses import clip_loss


def clip_step(model, x, tok, idx):
    img = model.encode_image(x, normalize=True)
    txt = model.encode_text(tok, normalize=True)
    return clip_loss(img.float(), txt.float(), model.logit_scale.exp()), {"logit_scale": model.logit_scale.exp().item()}


def train_clip(model_name: str, images: np.ndarray, captions: list[str], cfg: TrainCfg, seed: int,
               device: torch.device, out_dir: Path, desc: str, log: Callable | None = None,
               extra_meta: dict | None = None) -> dict:
    """Train a fresh model from its config on (images, captions) and save it as safetensors."""
    torch.manual_seed(seed)
    model = create_model(model_name, device=device)
    tokens = tokenize_all(open_clip.get_tokenizer(model_name), captions)
    history = train(model, images, tokens, cfg, clip_step, seed, device, desc, log)
    save_checkpoint(model, out_dir, model_name, {**(extra_meta or {}), "train_pairs": len(captions)})
    return history
