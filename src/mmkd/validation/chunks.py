"""Owns the streamed pass over the curated manifest: bounded chunks, manifest-wide counters, cross-chunk uniqueness.

Validation reads manifest.jsonl `validate.chunk_rows` records at a time, so its peak memory does not grow with the
corpus. What a chunk cannot see alone is kept here, small: the split / train-modality / shard row counters, the
largest record size, and for every `unique` rule an 8-byte digest per non-null row (pandas' 64-bit hash), sorted
once at the end to find values repeated anywhere in the manifest. Great Expectations' per-chunk results are folded
into one result per suite (`fold`, `finish`), so Data Docs show one page per frame, not one per chunk.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from mmkd.data.clean import UNKNOWN
from mmkd.data.manifest import iter_manifest

PARTIAL = 20  # Great Expectations' partial_unexpected_list length (result_format SUMMARY): the aggregate keeps as many
COUNTED = ("shard", "size", "split", "modality")  # the columns the counters read, besides the rules' own


def iter_chunks(path: Path, chunk_rows: int, columns: list[str]) -> Iterator[pd.DataFrame]:
    """The manifest as frames of at most chunk_rows rows holding `columns` (a record lacking one: null there),
    indexed by row number in the file's record order, so unexpected-index lists name manifest rows."""
    rows: list[list] = []
    start = 0
    for rec in iter_manifest(path):
        # only the checked columns are kept (a missing key is NaN, as in a frame of the whole records)
        rows.append([rec.get(c, np.nan) for c in columns])
        if len(rows) == chunk_rows:
            df, rows = _frame(rows, columns, start), []  # the frame alone is held while the suite runs
            start += len(df)
            yield df
    if rows:
        yield _frame(rows, columns, start)


def _frame(rows: list[list], columns: list[str], start: int) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    df.index = pd.RangeIndex(start, start + len(df))
    if "caption" in df:  # a missing caption is an empty one: the length rule names it
        df["caption"] = df["caption"].fillna("").astype(str)
    return df


def digests(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, 64-bit digests) of a column's non-null values; equal values have equal digests."""
    col = col[col.notna()]
    return col.index.to_numpy(), pd.util.hash_pandas_object(col, index=False).to_numpy(np.uint64)


class Tally:
    """The manifest-wide facts the per-chunk suites cannot see, updated chunk by chunk in bounded memory
    (except the digests: 8 bytes per row for each unique column)."""

    def __init__(self, unique_columns: list[str]):
        self.rows = 0
        self.splits: Counter = Counter()
        self.train_modalities: Counter = Counter()
        self.unknown = 0
        self.shards: Counter = Counter()
        self.max_size = 0
        self._blocks: dict[str, list[np.ndarray]] = {c: [] for c in unique_columns}

    def add(self, df: pd.DataFrame) -> None:
        self.rows += len(df)
        self.splits.update(df["split"].value_counts().to_dict())
        self.train_modalities.update(df.loc[df["split"] == "train", "modality"].value_counts().to_dict())
        self.unknown += int((df["modality"] == UNKNOWN).sum())
        self.shards.update(df["shard"].value_counts().to_dict())
        size = pd.to_numeric(df["size"], errors="coerce").max()
        if pd.notna(size):
            self.max_size = max(self.max_size, int(size))
        for c, blocks in self._blocks.items():
            blocks.append(digests(df[c])[1])

    def repeated(self) -> dict[str, np.ndarray]:
        """Per unique column, the sorted digests seen on more than one row (empty: the column is unique)."""
        out = {}
        for c, blocks in self._blocks.items():
            d = np.empty(sum(len(b) for b in blocks), np.uint64)
            at = 0
            while blocks:  # copied block by block and released: the column's digests are held once, not twice
                b = blocks.pop(0)
                d[at:at + len(b)] = b
                at += len(b)
            d.sort()
            out[c] = np.unique(d[1:][d[1:] == d[:-1]])
            del d
        return out


def duplicates(path: Path, chunk_rows: int, repeated: dict[str, np.ndarray]) -> dict[str, dict]:
    """A second streamed pass, only over columns with a repeated digest: per column the rows whose value occurs
    more than once in the manifest (as Great Expectations counts a non-unique column: every copy), their first
    values and row numbers. Two different values sharing a 64-bit digest (p ~ rows^2 / 2^65) would be reported
    as a duplicate naming both values; a real duplicate is never missed."""
    columns = [c for c, d in repeated.items() if len(d)]
    out = {c: {"count": 0, "values": [], "rows": []} for c in columns}
    if not columns:
        return out
    for df in iter_chunks(path, chunk_rows, columns):
        for c in columns:
            rows, d = digests(df[c])
            hit = rows[np.isin(d, repeated[c])]
            o = out[c]
            o["count"] += len(hit)
            take = hit[:PARTIAL - len(o["rows"])]
            o["rows"] += [int(r) for r in take]
            o["values"] += df.loc[take, c].tolist()
    return out


def fold(acc, new) -> None:
    """Add one chunk's suite result (Great Expectations' ExpectationSuiteValidationResult) into the running one:
    counts summed, success and-ed, the first exception and the first PARTIAL unexpected values kept."""
    for a, b in zip(acc.results, new.results, strict=True):
        assert a.expectation_config.type == b.expectation_config.type, "chunks ran different suites"
        a.success = bool(a.success and b.success)
        if b.exception_info and b.exception_info.get("raised_exception") and not (
                a.exception_info and a.exception_info.get("raised_exception")):
            a.exception_info = b.exception_info
        ra, rb = a.result, b.result or {}
        if ra is None:
            a.result = dict(rb)
            continue
        for k in ("element_count", "missing_count", "unexpected_count"):
            if k in rb:
                ra[k] = ra.get(k, 0) + rb[k]
        for k in ("partial_unexpected_list", "partial_unexpected_index_list"):
            if k in rb:
                ra[k] = (list(ra.get(k) or []) + list(rb[k] or []))[:PARTIAL]


def set_unexpected(r, count: int, values: list, rows: list[int]) -> None:
    """Replace one expectation's per-chunk counts with the manifest-wide ones (a unique rule's duplicates)."""
    raised = bool(r.exception_info and r.exception_info.get("raised_exception"))
    r.result = {**(r.result or {}), "unexpected_count": count, "partial_unexpected_list": values[:PARTIAL],
                "partial_unexpected_index_list": rows[:PARTIAL]}
    r.success = count == 0 and not raised


def finish(acc) -> None:
    """Percentages, value counts and the suite's statistics recomputed from the folded counts."""
    for r in acc.results:
        res = r.result
        if not res or "element_count" not in res:
            continue
        n, miss, bad = res["element_count"], res.get("missing_count", 0), res.get("unexpected_count", 0)
        if "missing_count" in res:
            res["missing_percent"] = miss / n * 100 if n else None
        if "unexpected_count" in res:
            res["unexpected_percent_total"] = bad / n * 100 if n else None
            res["unexpected_percent"] = res["unexpected_percent_nonmissing"] = bad / (n - miss) * 100 if n - miss else None
        if "partial_unexpected_counts" in res:  # over the kept values, as GX's own (top values, most frequent first)
            counts = Counter(map(_hashable, res.get("partial_unexpected_list") or []))
            res["partial_unexpected_counts"] = [{"value": v, "count": c} for v, c in counts.most_common(PARTIAL)]
    ok = sum(bool(r.success) for r in acc.results)
    acc.success = ok == len(acc.results)
    acc.statistics.update(evaluated_expectations=len(acc.results), successful_expectations=ok,
                          unsuccessful_expectations=len(acc.results) - ok,
                          success_percent=ok / len(acc.results) * 100 if acc.results else None)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v
