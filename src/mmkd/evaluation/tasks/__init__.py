"""Owns the six evaluation task types, each a pure function from frozen embeddings to metrics with 95% CIs."""

from __future__ import annotations

from contextlib import contextmanager

import torch

BOOTSTRAP_SEED = 42  # the reference's; fixed, so every CI repeats exactly


@contextmanager
def one_torch_thread():
    """Train a small head on one intra-op thread: its ops are too small to share, and on 2 cores a second thread
    halves the speed (measured on MIL: 2.5 s -> 1.1 s). A fixed thread count also fixes the float reduction
    order, so the result does not depend on the machine's thread setting. Process-wide: evaluation units run
    one after another."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
