"""Owns CLIP-style contrastive training of one open_clip model on curated pairs (teachers and stage 1)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch

from mmkd.config import TrainCfg
from mmkd.models.factory import create_model, save_checkpoint
from mmkd.training import distributed
from mmkd.training.loop import tokenize_all, train
from mmkd.training.objective import ClipObjective


def train_clip(model_name: str, images: np.ndarray, captions: list[str], cfg: TrainCfg, seed: int,
               device: torch.device, out_dir: Path, desc: str, log: Callable | None = None,
               extra_meta: dict | None = None, state_dir: Path | None = None,
               init: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Train a model from its config on (images, captions) and save it as safetensors (rank 0).

    init, when given, loads starting weights into the fresh model (e.g. a natural-image CLIP) and returns what
    it loaded, which becomes part of the run's fingerprint and metadata.
    """
    torch.manual_seed(seed)
    model = create_model(model_name, device=device)
    started_from = init(model) if init else {}
    tokens = tokenize_all(open_clip.get_tokenizer(model_name), captions)
    data_id = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    history = train(model, images, tokens, cfg, ClipObjective(), seed, device, desc, log, state_dir,
                    {"model": model_name, "init": started_from, "captions": data_id})
    if distributed.is_main():
        save_checkpoint(model, out_dir, model_name, {**(extra_meta or {}), "train_pairs": len(captions),
                                                     **({"init": started_from} if started_from else {})})
    return history
