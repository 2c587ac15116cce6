"""Owns reading a record's raw bytes (a file, or a member of a tar by offset) and decoding them to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmkd.data.imaging import RecordError, open_image, to_rgb8


def raw_bytes(loc: dict) -> bytes:
    """The bytes a record's pixels come from; a missing file is a RecordError naming it."""
    if "tar" in loc:
        with open(loc["tar"], "rb") as fh:
            fh.seek(loc["offset"])
            data = fh.read(loc["size"])
        if len(data) != loc["size"]:
            raise RecordError(f"tar member {loc.get('member')} truncated in {Path(loc['tar']).name}")
        return data
    path = Path(loc["path"])
    if not path.is_file():
        raise RecordError(f"image file not found: {loc.get('rel', path.name)}")
    return path.read_bytes()


def decode_bytes(data: bytes, cfg) -> np.ndarray:
    return to_rgb8(open_image(data, cfg, cfg.allowed_formats), cfg.highbit_percentiles)


def load_pixels(rec, cfg) -> np.ndarray:
    return decode_bytes(raw_bytes(rec.loc), cfg)
