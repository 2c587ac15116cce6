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
from PIL import Image

THUMB = 32


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The 32x32 grey thumbnail near-duplicates are confirmed on."""
    return np.asarray(Image.fromarray(rgb).convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)


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
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2000; PRAGMA temp_store=FILE;
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
        """(id, difference) of the earliest near-identical image, or None. Candidates come from the bands in one
        query; Hamming distances, then thumbnail differences, are computed for all of them at once."""
        if self.near_bits < 0:
            return None
        bands = _bands(phash, self.near_bits)
        where = " OR ".join(["(band=? AND value=?)"] * len(bands))
        rows = self.db.execute(f"SELECT DISTINCT rid FROM bands WHERE {where}",
                               [x for bv in enumerate(bands) for x in bv]).fetchall()
        if not rows:
            return None
        rids = [r[0] for r in rows]
        found = self.db.execute(f"SELECT rid, phash FROM images WHERE rid IN ({','.join('?' * len(rids))})",
                                rids).fetchall()
        cand = np.array([r[0] for r in found], dtype=np.int64)
        other = np.array([r[1] for r in found], dtype=np.int64).view(np.uint64)
        close = cand[np.bitwise_count(other ^ np.uint64(phash)) <= self.near_bits]
        if not len(close):
            return None
        close = sorted(int(c) for c in close)  # earliest first: the record met first is the one kept
        found = self.db.execute(f"SELECT rid, id, thumb FROM images WHERE rid IN ({','.join('?' * len(close))}) "
                                "ORDER BY rid", close).fetchall()
        thumbs = np.stack([np.frombuffer(r[2], np.uint8) for r in found]).astype(np.int16)
        diff = np.abs(thumbs - thumb.astype(np.int16).ravel()).mean(axis=1)
        hit = np.flatnonzero(diff <= self.max_diff)
        return (found[hit[0]][1], float(diff[hit[0]])) if len(hit) else None

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
