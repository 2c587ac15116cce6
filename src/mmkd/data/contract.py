"""Owns the contract between curation and validation: the per-record rules a kept record satisfies, checked twice.

Curation's worker checks them on each record before keeping it (so a record validation would refuse is
quarantined with its reason, and one bad row never blocks a later run); validation builds its Great
Expectations suite from the same rules, and `violations` evaluates them in pandas. The bounds come from
CurateCfg only, so the two sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mmkd.config import MODALITIES
from mmkd.data.clean import UNKNOWN
from mmkd.data.imaging import RecordError
from mmkd.data.splits import SPLITS


@dataclass(frozen=True)
class Rule:
    """One manifest-column rule: not_null, unique, length (of a string), between (inclusive), in_set."""

    kind: str
    column: str
    lo: float | None = None
    hi: float | None = None
    values: tuple = ()

    def describe(self) -> str:
        if self.kind in ("length", "between"):
            return f"{self.column} {'length ' if self.kind == 'length' else ''}between {self.lo} and {self.hi}"
        return f"{self.column} {self.kind.replace('_', ' ')}" + (f" {list(self.values)}" if self.values else "")


def manifest_rules(curate) -> list[Rule]:
    """Every rule validation checks on each manifest row, with curation's bounds."""
    return [Rule("not_null", "id"), Rule("unique", "id"), Rule("unique", "key"),
            Rule("length", "caption", curate.min_caption_chars, curate.max_caption_chars),
            Rule("in_set", "modality", values=(*MODALITIES, UNKNOWN)), Rule("in_set", "split", values=tuple(SPLITS)),
            Rule("between", "width", curate.min_side, curate.max_side),
            Rule("between", "height", curate.min_side, curate.max_side),
            Rule("not_null", "source")]


def row_violation(row: dict[str, Any], rules: list[Rule]) -> Rule | None:
    """The first per-row rule a would-be manifest row breaks (columns it lacks are checked elsewhere)."""
    for r in rules:
        if r.column not in row or r.kind == "unique":  # uniqueness is the curating loop's (duplicate ids, pixels)
            continue
        v = row[r.column]
        if (r.kind == "not_null" and v is None) or (r.kind == "in_set" and v not in r.values) \
                or (r.kind == "length" and not r.lo <= len(v) <= r.hi) or (r.kind == "between" and not r.lo <= v <= r.hi):
            return r
    return None


def violations(df, rules: list[Rule]) -> list[dict]:
    """The rules a manifest frame breaks, as validation reports them: rule, unexpected_count, examples."""
    out = []
    for r in rules:
        col = df[r.column]
        if r.kind == "not_null":
            bad = col.isna()
        elif r.kind == "unique":
            bad = col.duplicated(keep=False) & col.notna()
        elif r.kind == "length":
            n = col.dropna().astype(str).str.len()
            bad = ~n.between(r.lo, r.hi).reindex(col.index, fill_value=True)
        elif r.kind == "between":
            bad = ~col.dropna().between(r.lo, r.hi).reindex(col.index, fill_value=True)
        else:
            bad = ~col.dropna().isin(r.values).reindex(col.index, fill_value=True)
        if bad.any():
            out.append({"rule": r.describe(), "unexpected_count": int(bad.sum()),
                        "examples": [str(v) for v in col[bad].head(5)]})
    return out


def check_caption(caption: str, cfg) -> None:
    """Caption bounds after scrubbing: a caption outside them is quarantined here, never refused by validation."""
    if len(caption) < cfg.min_caption_chars:
        raise RecordError("empty caption" if not caption else f"caption shorter than {cfg.min_caption_chars} chars")
    if len(caption) > cfg.max_caption_chars:
        raise RecordError(f"caption too long: {len(caption)} chars > max_caption_chars {cfg.max_caption_chars}")


def check_stored(stored: np.ndarray, orig_shape: tuple[int, ...], cfg) -> None:
    """The stored pixels: both sides in [min_side, max_side] after downscaling, and some information in them."""
    h, w = stored.shape[:2]
    if min(h, w) < cfg.min_side:  # downscaling the long side to max_side took the short side below min_side
        raise RecordError(f"aspect ratio too extreme: {orig_shape[1]}x{orig_shape[0]} is stored as {w}x{h} "
                          f"(max_side {cfg.max_side}), below min_side {cfg.min_side}")
    # per channel (the largest): one flat colour is no information either, however far apart its channels are
    std = float(stored.reshape(-1, stored.shape[-1] if stored.ndim == 3 else 1).std(axis=0, dtype=np.float64).max())
    if std < cfg.min_pixel_std:
        raise RecordError(f"no information: pixel std {std:.3f} < min_pixel_std {cfg.min_pixel_std} "
                          "(a constant or nearly constant image)")
