"""A stand-in teacher for the scale harness: a fixed random projection with a configurable forward cost."""

from __future__ import annotations

import hashlib

import torch

from mmkd.config import TeacherSpec
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import ImageSpec

DIM = 512
WIDTH = 1024  # the hidden width of the cost layers: 2 x WIDTH^2 multiply-adds per pair and layer


class StandIn(Encoder):
    """Images: 8x8 average-pooled pixels through `layers` seeded [WIDTH, WIDTH] tanh layers and a projection
    to DIM; texts: hashed word counts through the same. The features depend on the input (alignment and
    distillation have something to fit); the forward cost is `layers` x 2 x WIDTH^2 FLOPs per image (~2 MFLOP
    per layer), set to taste to stand for a real teacher's cost on the hardware at hand."""

    def __init__(self, name: str, size: int, layers: int, seed: int = 0):
        super().__init__(name, ImageSpec(size), torch.device("cpu"), version=f"standin-{size}-{layers}-{seed}")
        g = torch.Generator().manual_seed(seed)
        self.inp = torch.randn(3 * 64, WIDTH, generator=g) / 14
        self.txt = torch.randn(4096, WIDTH, generator=g) / 8
        self.hidden = [torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5 for _ in range(layers)]
        self.out = torch.randn(WIDTH, DIM, generator=g) / WIDTH ** 0.5

    def _tower(self, h: torch.Tensor) -> torch.Tensor:
        for w in self.hidden:
            h = torch.tanh(h @ w)
        return h @ self.out

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1)  # [B, 3 * 64]
        return self._tower(pooled @ self.inp)

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        counts = torch.zeros(len(texts), 4096)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                counts[i, int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % 4096] += 1
        return self._tower(counts @ self.txt)


def standins(n: int, layers: int) -> list[tuple[TeacherSpec, StandIn]]:
    """n stand-in teachers, alternately at 48 and 64 px (the default profile's decoded views), each covering
    every modality: (registry spec, encoder) pairs as cache_corpus takes them."""
    return [(TeacherSpec(name=f"standin-{k}", loader="embedded", model="standin"),
             StandIn(f"standin-{k}", (48, 64)[k % 2], layers, seed=k)) for k in range(n)]
