"""Owns reading teacher features for a fixed list of samples, batch by batch, from a FeatureStore."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmkd.features.checks import FeatureError

if TYPE_CHECKING:
    from mmkd.features.store import FeatureStore


class TeacherFeatures:
    """Teacher features for a fixed list of samples, read by batch from the store (nothing corpus-sized in RAM
    but the per-sample locations): `batch(idx)` -> {teacher: (image, text)} and the availability mask."""

    def __init__(self, store: FeatureStore, sets: list[tuple[str, str]], keys: np.ndarray):
        self.store, self.sets = store, list(sets)
        self.names = [t for t, _ in self.sets]
        self.dims = [store.set_info(t, v)["dim"] for t, v in self.sets]
        located = [store.locate(t, v, keys) for t, v in self.sets]
        self.shard = np.stack([s for s, _ in located], axis=1)  # [N, T]
        self.row = np.stack([r for _, r in located], axis=1)
        self.available = self.shard >= 0  # [N, T]: the per-sample coverage
        self._reads = 0

    def __len__(self) -> int:
        return len(self.shard)

    def batch(self, idx: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        idx = np.asarray(idx, dtype=np.int64)
        out = {t: self.store.gather(self.shard[idx, j], self.row[idx, j], d)
               for j, (t, d) in enumerate(zip(self.names, self.dims))}
        self._reads += 1
        if self._reads % 16 == 0:
            self.store.release()
        return out

    def stacked(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, T, d] image and text (all sets of one dim, e.g. projected) and the [B, T] availability."""
        if len(set(self.dims)) != 1:
            raise FeatureError(f"feature sets of different dims {dict(zip(self.names, self.dims))} cannot be stacked")
        parts = self.batch(idx)
        img = np.stack([parts[t][0] for t in self.names], axis=1)
        txt = np.stack([parts[t][1] for t in self.names], axis=1)
        return img, txt, self.available[np.asarray(idx, dtype=np.int64)]

    def chosen(self, idx: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, d] image and text of one teacher per sample (choice: column per sample): only those rows are read."""
        idx, choice = np.asarray(idx, dtype=np.int64), np.asarray(choice, dtype=np.int64)
        dim = self.dims[0]
        if len(set(self.dims)) != 1:
            raise FeatureError(f"feature sets of different dims {dict(zip(self.names, self.dims))}")
        img, txt = np.zeros((len(idx), dim), np.float32), np.zeros((len(idx), dim), np.float32)
        for j in np.unique(choice):
            sel = np.flatnonzero(choice == j)
            img[sel], txt[sel] = self.store.gather(self.shard[idx[sel], j], self.row[idx[sel], j], dim)
        self._reads += 1
        if self._reads % 16 == 0:
            self.store.release()
        return img, txt
