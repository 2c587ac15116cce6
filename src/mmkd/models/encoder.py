"""Owns the one interface every model (teacher or student) is used through: images/texts in, unit embeddings out."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mmkd.models.factory import image_spec, to_tensor


class ClipEncoder:
    """Wraps an open_clip-style model and its tokenizer; embeddings are L2-normalised float32 numpy."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Callable, device: torch.device):
        self.name = name
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.spec = image_spec(self.model)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i : i + batch_size], self.spec, self.device)
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 512) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
