"""Owns reading scattered rows of .npy feature files with pread: a bounded set of open files, each run of
consecutive rows one read, nothing memory-mapped.

Why not the memory maps: a page a process touches through a map counts in its RSS until released, and the kernel
maps the pages around each fault (fault-around, 64 KiB), so a few batches of random rows map whole shards. Measured
on the scale harness's 1 M-pair aligned store (124 shards of 8 MiB), 10 random batches of 128 rows put 1.6 GiB of
the store in the reading process's RSS. Read with pread, a batch costs its rows' bytes and nothing stays.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from mmkd.features.checks import FeatureError


class RowReader:
    """Rows of 2-d C-order .npy files by row index. At most `max_open` files are open at a time (least recently
    used closed first): a store of thousands of shards does not need thousands of descriptors. A file reopened
    after eviction must be the file first opened (same inode, size and mtime), else FeatureError: the caller
    checked that one's bytes. Thread-safe (the training loop reads in a prefetch thread)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._open: OrderedDict[str, int] = OrderedDict()
        self._layout: dict[str, tuple[int, np.dtype, int, tuple]] = {}  # path -> data offset, dtype, dim, identity
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        fd = self._open.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            if path not in self._layout:
                with os.fdopen(os.dup(fd), "rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(fh)
                    if fortran or len(shape) != 2:
                        os.close(fd)
                        raise FeatureError(f"{path}: expected a C-order [n, dim] array, got {shape}")
                    self._layout[path] = (fh.tell(), np.dtype(dtype), int(shape[1]), ident)
            elif self._layout[path][3] != ident:
                os.close(fd)
                raise FeatureError(f"{path} changed while this process was reading its store (another run rewrote "
                                   "it); run the step again")
            while len(self._open) >= self.max_open:
                os.close(self._open.popitem(last=False)[1])
        self._open[path] = fd  # most recently used last
        return fd

    def read(self, path: str, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim] of the file's rows (any order, repeats allowed)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self._dim(str(path))), np.float32)
        with self._lock:
            fd = self._fd(str(path))
            offset, dtype, dim, _ = self._layout[str(path)]
            width = dim * dtype.itemsize
            out = np.empty((len(rows), dim), np.float32)
            order = np.argsort(rows, kind="stable")
            ordered = rows[order]
            cuts = np.flatnonzero(np.diff(ordered) > 1) + 1  # runs of consecutive (or repeated) rows: one read each
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
                lo, hi = int(ordered[a]), int(ordered[b - 1]) + 1
                data = os.pread(fd, (hi - lo) * width, offset + lo * width)
                if len(data) != (hi - lo) * width:
                    raise FeatureError(f"{path}: truncated (rows {lo}..{hi - 1} asked)")
                out[order[a:b]] = np.frombuffer(data, dtype).reshape(hi - lo, dim)[ordered[a:b] - lo]
        return out

    def forget(self, path: str) -> None:
        """Close `path` and drop what was learnt of it (its shard was dropped; a new file may take the name)."""
        with self._lock:
            fd = self._open.pop(str(path), None)
            if fd is not None:
                os.close(fd)
            self._layout.pop(str(path), None)

    def _dim(self, path: str) -> int:
        with self._lock:
            self._fd(path)
            return self._layout[path][2]

    def close(self) -> None:
        with self._lock:
            while self._open:
                os.close(self._open.popitem()[1])
            self._layout.clear()
