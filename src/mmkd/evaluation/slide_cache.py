"""Owns the per-slide tile embedding cache: one file per (slide, encoder weights, input size, mpp, tile size),
its rows matched to tiles by coordinates, valid while the slide file's path, size and mtime are unchanged."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from mmkd import atomic

log = logging.getLogger("mmkd")


def _sha(*parts) -> str:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


class TileCache:
    """`lookup` the cached rows of some tiles, `store` rows back (merged with what the file holds). Without a
    folder (the evaluation's cache_embeddings off) nothing is read or written."""

    def __init__(self, folder: Path | None, slide: Path, stat_key: str, model_version: str, size: int,
                 mpp: float, tile_px: int):
        # the name is the slide and the settings; the key inside also says which bytes (a re-scanned slide with
        # the same name replaces the file instead of piling up beside it)
        self.path = None if folder is None else (
            Path(folder) / f"{slide.stem}-{_sha(slide, model_version, size, mpp, tile_px)[:16]}.npz")
        self.key = _sha(stat_key, model_version, size, mpp, tile_px)[:24]

    def _read(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["key"]) != self.key:
                    log.info("tile cache %s is stale (slide or weights changed): re-encoding", self.path.name)
                    return None
                return z["coords"], z["image"]
        except (OSError, ValueError, KeyError) as e:  # a damaged file is re-encoded, never trusted
            log.warning("tile cache %s unreadable (%s): re-encoding", self.path, e)
            return None

    def lookup(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(hit mask (n,), rows (n, D) with the hits filled, or None when nothing is cached)."""
        held = self._read()
        hit = np.zeros(len(coords), bool)
        if held is None:
            return hit, None
        where = {r.tobytes(): i for i, r in enumerate(held[0])}
        pos = np.array([where.get(c.tobytes(), -1) for c in coords], np.int64)
        hit = pos >= 0
        rows = np.zeros((len(coords), held[1].shape[1]), np.float32)
        rows[hit] = held[1][pos[hit]]
        return hit, rows

    def store(self, coords: np.ndarray, rows: np.ndarray) -> None:
        """These tiles' rows, plus every other tile the file held (a smaller max_tiles keeps the larger set)."""
        if self.path is None:
            return
        held = self._read()
        if held is not None:
            mine = {c.tobytes() for c in coords}
            keep = np.array([r.tobytes() not in mine for r in held[0]], bool)
            coords, rows = np.concatenate([held[0][keep], coords]), np.concatenate([held[1][keep], rows])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(self.path) as fh:
            np.savez(fh, key=np.array(self.key), coords=coords.astype(np.int64), image=rows.astype(np.float32))
