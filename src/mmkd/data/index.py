"""Owns curation's lookup index: ids, pixel hashes, near-duplicate candidates and group splits, on disk (SQLite).

Kept out of RAM so that curating 10x the corpus does not need 10x the memory. Near duplicates: the
64-bit pHash is cut into `bits + 1` bands, so any pair within `bits` differing bits shares a band
(pigeonhole); candidates are then confirmed on a 32x32 grayscale thumbnail (mean absolute difference),
because 64 bits alone cannot tell apart two distinct images of one synthetic modality.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import numpy as np

THUMB = 32


def _bands(phash: int, bits: int) -> list[int]:
    n = bits + 1
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [(phash >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v  # SQLite integers are signed 64-bit


class CurationIndex:
    def __init__(self, near_bits: int, max_diff: float, folder: Path | None = None):
        self.tmp = tempfile.TemporaryDirectory(prefix="mmkd-curate-", dir=folder)
        self.db = sqlite3.connect(Path(self.tmp.name) / "index.sqlite", isolation_level=None)
        self.db.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-8000;
            CREATE TABLE ids (id TEXT PRIMARY KEY, at TEXT);
            CREATE TABLE content (hash TEXT PRIMARY KEY, id TEXT);
            CREATE TABLE bands (band INTEGER, value INTEGER, rid INTEGER);
            CREATE INDEX bands_i ON bands (band, value);
            CREATE TABLE images (rid INTEGER PRIMARY KEY, id TEXT, phash INTEGER, thumb BLOB);
            CREATE TABLE groups (token TEXT PRIMARY KEY, split TEXT);
        """)
        self.db.execute("BEGIN")
        self.near_bits, self.max_diff = near_bits, max_diff

    def close(self) -> None:
        self.db.close()
        self.tmp.cleanup()

    def id_seen(self, rid: str) -> str | None:
        row = self.db.execute("SELECT at FROM ids WHERE id=?", (rid,)).fetchone()
        return row[0] if row else None

    def content_seen(self, digest: str) -> str | None:
        row = self.db.execute("SELECT id FROM content WHERE hash=?", (digest,)).fetchone()
        return row[0] if row else None

    def near_duplicate(self, phash: int, thumb: np.ndarray) -> tuple[str, float] | None:
        """(id, difference) of an earlier near-identical image, or None."""
        if self.near_bits < 0:
            return None
        seen = set()
        for band, value in enumerate(_bands(phash, self.near_bits)):
            for (rid,) in self.db.execute("SELECT rid FROM bands WHERE band=? AND value=?", (band, value)):
                if rid in seen:
                    continue
                seen.add(rid)
                rid_id, other, blob = self.db.execute("SELECT id, phash, thumb FROM images WHERE rid=?", (rid,)).fetchone()
                if bin((other & (2**64 - 1)) ^ phash).count("1") > self.near_bits:
                    continue
                diff = float(np.abs(np.frombuffer(blob, np.uint8).astype(np.int16) - thumb.astype(np.int16).ravel()).mean())
                if diff <= self.max_diff:
                    return rid_id, diff
        return None

    def group_split(self, token: str) -> str | None:
        row = self.db.execute("SELECT split FROM groups WHERE token=?", (token,)).fetchone()
        return row[0] if row else None

    def add(self, rid: str, at: str, digest: str, phash: int, thumb: np.ndarray, token: str, split: str) -> None:
        self.db.execute("INSERT INTO ids VALUES (?, ?)", (rid, at))
        self.db.execute("INSERT INTO content VALUES (?, ?)", (digest, rid))
        cur = self.db.execute("INSERT INTO images (id, phash, thumb) VALUES (?, ?, ?)",
                              (rid, _signed(phash), np.ascontiguousarray(thumb, np.uint8).tobytes()))
        if self.near_bits >= 0:
            self.db.executemany("INSERT INTO bands VALUES (?, ?, ?)",
                                [(b, v, cur.lastrowid) for b, v in enumerate(_bands(phash, self.near_bits))])
        self.db.execute("INSERT OR IGNORE INTO groups VALUES (?, ?)", (token, split))
