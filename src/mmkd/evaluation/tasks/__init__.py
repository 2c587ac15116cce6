"""Owns the six evaluation task types, each a pure function from frozen embeddings to metrics with 95% CIs."""

from __future__ import annotations

from contextlib import contextmanager

import torch

BOOTSTRAP_SEED = 42  # the reference's; fixed, so every CI repeats exactly


@contextmanager
def one_torch_thread():
    """Train a small head on one intra-op thread: its ops are too small to share (MIL in a worker thread, as
    Prefect runs units: 0.81-0.85 of the 2-thread time, bench/small_heads_threads.py). A fixed thread count
    also fixes the float reduction order, so the result does not depend on `threads`. Process-wide: the
    evaluation's units run one after another."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
