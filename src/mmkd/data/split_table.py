"""Owns one curated split held compactly for corpus-sized readers (training, align, caching's summary): fixed-width
columns (key, shard, row, modality) and where each record's manifest line is, so captions and other fields are read
back by offset when a batch needs them. About 60 bytes a record, where split_records' dicts take 300 to 1,500.

The manifest is opened once, when the table is built: a later curation run that switches in a new generation does
not change what this table reads (as the memory-mapped views opened at the same time)."""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path

import numpy as np

KEY_BYTES = 32  # curated keys are 32 hex digits (a content hash); stored as numpy S32, as the feature stores do


class SplitTable:
    """Records of one split in shard order (as split_records), as columns:

    keys      S32 [n]; shard int32 [n] (index into shard_names, which are sorted); row int32 [n];
    modality  int16 [n] codes into modality_names (a name may be None: unknown);
    offset / length  the record's manifest line, read back by field(), record() and captions().
    `len(table)` and `table[i]` (the whole record, as a dict) let it stand where a record list is expected."""

    def __init__(self, curated_dir: Path, split: str):
        from mmkd.data.store import CurationError, manifest_path

        self.path, self.split = manifest_path(curated_dir), split
        self.fd = os.open(self.path, os.O_RDONLY)
        shard_code, mod_code = {}, {}
        keys, shard, row, mod = bytearray(), array("i"), array("i"), array("h")
        offset, length = array("q"), array("i")
        caption_hash = hashlib.sha256()  # in manifest order: equal to shard order unless the lines were reordered
        at = 0
        with os.fdopen(os.dup(self.fd), "rb") as fh:
            for number, line in enumerate(fh, 1):
                start, at = at, at + len(line)
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    if r["split"] != split:
                        continue
                    key, name, at_row, caption = r["key"].encode("ascii"), str(r["shard"]), int(r["row"]), r["caption"]
                    caption = caption.encode()
                except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a damaged line, named
                    raise CurationError(f"{self.path}: line {number} is not a curated record ({type(exc).__name__}: "
                                        f"{exc}); the store is damaged: run `mmkd verify`, then curate again") from None
                if len(key) > KEY_BYTES:
                    raise CurationError(f"{self.path}: line {number} (record {r.get('id')!r}): key {r['key']!r} is "
                                        f"longer than {KEY_BYTES} characters; the store is damaged, curate again")
                keys += key.ljust(KEY_BYTES, b"\0")
                shard.append(shard_code.setdefault(name, len(shard_code)))
                row.append(at_row)
                mod.append(mod_code.setdefault(r.get("modality"), len(mod_code)))
                offset.append(start)
                length.append(len(line))
                caption_hash.update((b"\n" if len(row) > 1 else b"") + caption)
        names = sorted(shard_code)
        rank = np.empty(len(names), np.int32)
        for i, name in enumerate(names):
            rank[shard_code[name]] = i
        shard_ranked = rank[np.frombuffer(shard, np.int32)] if len(shard) else np.zeros(0, np.int32)
        rows = np.frombuffer(row, np.int32) if len(row) else np.zeros(0, np.int32)
        order = np.lexsort((rows, shard_ranked))
        self.shard_names = names
        self.shard = shard_ranked[order]
        self.row = rows[order]
        self.keys = np.frombuffer(keys, f"S{KEY_BYTES}")[order] if len(row) else np.zeros(0, f"S{KEY_BYTES}")
        del keys  # the unsorted copy
        self.modality_names = list(mod_code)
        self.modality = np.frombuffer(mod, np.int16)[order] if len(row) else np.zeros(0, np.int16)
        self.offset = np.frombuffer(offset, np.int64)[order] if len(row) else np.zeros(0, np.int64)
        self.length = np.frombuffer(length, np.int32)[order] if len(row) else np.zeros(0, np.int32)
        in_order = bool(np.all(order == np.arange(len(order))))
        self._caption_digest = caption_hash.hexdigest() if in_order else None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        return self.record(int(i))

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __getstate__(self):
        raise TypeError("a SplitTable holds an open file; build one in each process")

    def record(self, i: int) -> dict:
        """The whole manifest record at row i."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: record {i} outside the {self.split} split's {len(self)}")
        data = os.pread(self.fd, int(self.length[i]), int(self.offset[i]))
        if len(data) != int(self.length[i]):
            raise OSError(f"{self.path}: truncated at byte {int(self.offset[i]) + len(data)} while reading record {i}")
        return json.loads(data)

    def field(self, name: str, idx=None) -> list:
        """One field of the records at idx (all: None), each read back from its manifest line."""
        rows = range(len(self)) if idx is None else idx
        return [self.record(int(i)).get(name) for i in rows]

    def modality_of(self, unknown: str | None = None) -> np.ndarray:
        """Each record's modality name (str array); `unknown` stands for records without one."""
        names = np.array([unknown if m is None else m for m in self.modality_names] or [""], dtype=object)
        return names[self.modality].astype(str) if len(self) else np.zeros(0, str)

    def findings(self) -> list:
        """Each record's class label (labels.finding; None: unlabelled), read back from the manifest."""
        return [(labels or {}).get("finding") for labels in self.field("labels")]

    def key_strings(self):
        """The keys as str, in order (what split_records gives), one at a time."""
        return (k.decode("ascii") for k in self.keys)

    def captions(self) -> "Captions":
        return Captions(self)

    def caption_digest(self) -> str:
        """sha256 of the captions joined by newlines, in shard order (what hashing split_records' captions gives)."""
        if self._caption_digest is None:  # lines out of shard order: a second pass, by offset
            h = hashlib.sha256()
            for at in range(0, len(self), 4096):
                part = self.field("caption", range(at, min(len(self), at + 4096)))
                h.update(("\n" if at else "").encode() + "\n".join(part).encode())
            self._caption_digest = h.hexdigest()
        return self._caption_digest


class Captions:
    """The captions of a SplitTable as a read-only sequence, each read from the manifest when indexed (training
    tokenises a batch at a time: nothing corpus-sized is held)."""

    def __init__(self, table: SplitTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.table.field("caption", range(len(self))[i])
        return self.table.record(int(i))["caption"]

    def __iter__(self):
        for at in range(0, len(self), 4096):
            yield from self.table.field("caption", range(at, min(len(self), at + 4096)))

    def digest(self) -> str:
        return self.table.caption_digest()


def text_digest(texts) -> str:
    """sha256 hex of texts joined by newlines, without building the joined string (a Captions knows its own)."""
    if isinstance(texts, Captions):
        return texts.digest()
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        h.update(("\n" if i else "").encode() + t.encode())
    return h.hexdigest()


def shard_counts(curated_dir: Path, records) -> dict[str, int]:
    """Rows per shard of records sorted by (shard, row), checking that row i of a shard is its i-th record."""
    from mmkd.data.store import CurationError

    def wrong(shard, row, expected):
        return CurationError(f"{curated_dir}: shard {shard}: manifest row {row} where row {expected} was expected "
                             "(records not from split_records, or a damaged manifest)")

    counts: dict[str, int] = {}
    if isinstance(records, SplitTable):  # the same check on the columns
        if not len(records):
            return counts
        starts = np.flatnonzero(np.r_[True, records.shard[1:] != records.shard[:-1]])  # each shard's first record
        first = np.repeat(starts, np.diff(np.r_[starts, len(records)]))
        bad = np.flatnonzero(records.row != np.arange(len(records)) - first)
        if len(bad):
            i = int(bad[0])
            raise wrong(records.shard_names[records.shard[i]], int(records.row[i]), int(i - first[i]))
        sizes = np.diff(np.r_[starts, len(records)])
        return {records.shard_names[records.shard[s]]: int(n) for s, n in zip(starts, sizes)}
    for r in records:
        if r["row"] != counts.get(r["shard"], 0):
            raise wrong(r["shard"], r["row"], counts.get(r["shard"], 0))
        counts[r["shard"]] = counts.get(r["shard"], 0) + 1
    return counts
