"""Model tests of the multi-teacher autoencoder's training schedule."""

from __future__ import annotations

import torch

from mmkd.config import AlignCfg
from mmkd.features.projector import train_projector


class _Recording:
    """A feature source that records which teacher each batch came from."""

    def __init__(self, name: str, rows: torch.Tensor, log: list):
        self.name, self.rows, self.log = name, rows, log
        self.shape = rows.shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        self.log.append(self.name)
        return self.rows[idx]


def test_projector_interleaves_teachers_within_an_epoch():
    log: list[str] = []
    gen = torch.Generator().manual_seed(0)
    feats = {t: _Recording(t, torch.randn(64, d, generator=gen), log) for t, d in (("a", 8), ("b", 12), ("c", 6))}
    train_projector(feats, 4, AlignCfg(hidden=16, epochs=1, batch_size=8), seed=0)
    assert sorted(log) == ["a"] * 8 + ["b"] * 8 + ["c"] * 8
    # teacher-by-teacher would switch teacher twice in an epoch; interleaved batches switch most of the time
    switches = sum(x != y for x, y in zip(log, log[1:]))
    assert switches >= 10, log
