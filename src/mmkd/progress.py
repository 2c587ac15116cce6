"""Owns progress bars: live in a terminal, a line every 30 s in logs (CI, Prefect workers) instead of thousands."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(*args, **kwargs) -> tqdm:
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(*args, **kwargs)
