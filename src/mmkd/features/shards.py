"""Owns writing one feature shard: validated rows streamed to .tmp files, hashed on the way, then renamed whole
(the layout and its guarantees: store.py's docstring)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmkd import atomic
from mmkd.features.checks import FeatureError, HashingFile, KEY_DTYPE, sums_path

DTYPES = {"float16": np.float16, "float32": np.float32}


def validate_rows(teacher: str, kind: str, arr: np.ndarray, dim: int, keys: np.ndarray, ids=None) -> None:
    """Reject non-finite or wrong-dimension features, naming the first bad sample."""
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise FeatureError(f"teacher '{teacher}': {kind} features have shape {tuple(arr.shape)}, expected "
                           f"[n, {dim}] (the teacher's embedding dim)")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        who = f"sample '{ids[i]}' (key {keys[i].decode()})" if ids is not None else f"key {keys[i].decode()}"
        raise FeatureError(f"teacher '{teacher}': {kind} features of {who} are not finite "
                           f"({int(bad.sum())} bad rows in this shard)")


class ShardWriter:
    """Streams one shard to disk batch by batch (memory stays one batch whatever the shard size): rows go to
    .tmp files whose .npy headers already hold the final row count, hashed as they are written; close() writes
    the sums file and renames the shard's files, keys last."""

    def __init__(self, root: Path, teacher: str, version: str, unit: str, rows: int, dim: int, dtype: str):
        self.teacher, self.dim, self.rows, self.dtype = teacher, dim, rows, np.dtype(DTYPES[dtype])
        folder = Path(root) / "shards" / teacher / version
        folder.mkdir(parents=True, exist_ok=True)
        self.prefix = folder / unit
        self.keys: list[bytes] = []
        self.files = {}
        for kind in ("image", "text"):
            fh = HashingFile(self._tmp(kind))
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (rows, dim)})
            self.files[kind] = fh

    def _tmp(self, kind: str) -> Path:
        return Path(f"{self.prefix}.{kind}.npy.tmp")

    def append(self, keys, image: np.ndarray, text: np.ndarray, ids=None) -> None:
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        if not (len(keys) == len(image) == len(text)):
            raise FeatureError(f"teacher '{self.teacher}': a batch of {len(keys)} keys has {len(image)} image and "
                               f"{len(text)} text rows")
        validate_rows(self.teacher, "image", image, self.dim, keys, ids)
        validate_rows(self.teacher, "text", text, self.dim, keys, ids)
        if len(self.keys) + len(keys) > self.rows:
            raise FeatureError(f"teacher '{self.teacher}': shard {self.prefix.name} planned for {self.rows} rows")
        self.files["image"].write(np.ascontiguousarray(image, self.dtype).tobytes())
        self.files["text"].write(np.ascontiguousarray(text, self.dtype).tobytes())
        self.keys.extend(keys.tolist())

    def close(self) -> Path:
        if len(self.keys) != self.rows:
            self.abort()
            raise FeatureError(f"teacher '{self.teacher}': shard {self.prefix.name} got {len(self.keys)} of "
                               f"{self.rows} planned rows")
        sums = {kind: fh.finish() for kind, fh in self.files.items()}
        keys = HashingFile(self._tmp("keys"))
        try:
            np.save(keys, np.array(self.keys, dtype=KEY_DTYPE))
        finally:
            sums["keys"] = keys.finish()
        atomic.write_json(sums_path(self.prefix), sums)
        for kind in ("image", "text", "keys"):  # keys last: a shard with keys.npy is whole
            os.replace(self._tmp(kind), Path(f"{self.prefix}.{kind}.npy"))
        atomic.fsync_dir(self.prefix.parent)
        return self.prefix

    def abort(self) -> None:
        for fh in self.files.values():
            fh.close()
        for kind in ("image", "text", "keys"):
            self._tmp(kind).unlink(missing_ok=True)


def write_shard(root: Path, teacher: str, version: str, unit: str, keys: np.ndarray, image: np.ndarray,
                text: np.ndarray, dim: int, dtype: str, ids=None) -> Path:
    """Validate and write one whole shard atomically; returns the path prefix. Not yet in the index (commit)."""
    writer = ShardWriter(root, teacher, version, unit, len(keys), dim, dtype)
    try:
        writer.append(keys, image, text, ids)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
