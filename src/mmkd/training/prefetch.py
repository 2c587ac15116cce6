"""Owns the training loop's batch reader: each step's rows gathered ahead in one background thread, or inline.

The reader gathers what a step reads from storage (images, tokens, the objective's teacher features) for a known
sequence of index batches. With depth > 0 a daemon thread runs `gather` up to `depth` batches ahead through a
bounded queue, so the read of batch k+1 overlaps the compute of batch k (numpy and torch release the GIL while
copying). With depth 0 it gathers in the caller's thread: the synchronous path. Both call the same `gather` on the
same batches in the same order, so a run's results do not depend on the depth; `gather` must read only (no RNG
the step also draws from, no training state). `wait_seconds` counts the time the caller was blocked on data.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable

import torch

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class BatchReader:
    """Iterates `gather(item)` over `items` (in order), `depth` batches ahead; use as a context manager so the
    thread stops when the consumer stops, whether it finished, raised or was interrupted."""

    def __init__(self, gather: Callable[[Any], Any], items: Iterable, depth: int, name: str = "mmkd-batch-reader"):
        if depth < 0:
            raise ValueError(f"train.prefetch must be >= 0, got {depth}")
        self.gather, self.items, self.depth = gather, iter(items), depth
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            # daemon: a process that is killed or exits while the thread blocks on a read never waits for it
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.items:
                if self._stop.is_set() or not self._put(self.gather(item)):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            self._put(_Failed(e))

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            if self._thread is None:
                return self.gather(next(self.items))
            value = self._queue.get()
            if value is _DONE:
                raise StopIteration
            if isinstance(value, _Failed):
                raise value.error
            return value
        finally:
            self.wait_seconds += time.perf_counter() - t

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread and wait for it: it finishes at most the one batch it is gathering (a read stuck longer
        than `timeout` is left to its daemon thread, which does not keep the process alive)."""
        if self._thread is None:
            return
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "BatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pin(value):
    """Page-locked copies of the tensors in value (a tensor, or a tuple / list / dict of them) so the host-to-device
    copy can run asynchronously (`non_blocking=True`); anything else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, (tuple, list)):
        return type(value)(pin(v) for v in value)
    if isinstance(value, dict):
        return {k: pin(v) for k, v in value.items()}
    return value
