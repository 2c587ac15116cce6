"""Owns the one interface every model (teacher or student) is used through: images/texts in, unit embeddings out."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmkd.models.factory import image_spec, to_tensor
from mmkd.models.preprocess import ImageSpec, prepare


class Encoder:
    """Images (uint8 NHWC at `spec.size`, or PIL) and texts -> L2-normalised float32 numpy embeddings.

    A family (open_clip, transformers CLIP, a bespoke adapter) implements `forward_images` on a normalised
    NCHW batch and `forward_texts` on raw strings (it owns its tokenizer). `version` identifies the weights
    and preprocessing, so the feature store never mixes features of two versions of one teacher.
    """

    def __init__(self, name: str, spec: ImageSpec, device: torch.device, version: str = "unversioned"):
        self.name, self.spec, self.device, self.version = name, spec, torch.device(device), version
        self._dim: int | None = None

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_texts(["a"]).shape[1])
        return self._dim

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i : i + batch_size], self.spec, self.device)
            out.append(F.normalize(self.forward_images(x).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def encode_pil(self, images: Sequence[Image.Image | np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Any-size images, preprocessed by this model's own spec (resize mode, interpolation) first."""
        arr = np.stack([prepare(im, self.spec) for im in images]) if len(images) else np.zeros((0, 1, 1, 3), np.uint8)
        return self.encode_images(arr, batch_size)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 512) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(F.normalize(self.forward_texts(list(texts[i : i + batch_size])).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


class ClipEncoder(Encoder):
    """An open_clip-style model (encode_image / encode_text) and its tokenizer."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Callable, device: torch.device,
                 spec: ImageSpec | None = None, version: str = "unversioned"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        super().__init__(name, spec or image_spec(self.model), device, version)

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))
