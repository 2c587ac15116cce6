"""Owns curation's lookup index: ids, pixel hashes, near-duplicate candidates and group splits, on disk (SQLite).

Kept out of RAM so that curating 10x the corpus does not need 10x the memory. Near duplicates are found by
multi-index hashing with bounded work per record: the 64-bit pHash is cut into m wide bands (3 bands of 21-22
bits for `bits` = 4); two hashes within `bits` differing bits differ in some band by at most `bits // m` bits
(pigeonhole), so each band's bucket and its neighbours within that radius are probed (67 probes for 4 bits).
Each probe reads at most BUCKET_CAP entries (the earliest), and at most CONFIRM_CAP Hamming-close candidates
(nearest first) are confirmed on a 32x32 grayscale thumbnail (mean absolute difference), because 64 bits
alone cannot tell apart two distinct images of one synthetic modality. Wide bands keep uniformly spread
hashes' buckets small (about 11 entries at 24 M records), so the caps only bind on crowded hashes (flat or
synthetic images); `cap_hits` counts the lookups where one did, and `close` logs it.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from functools import lru_cache
from itertools import combinations
from math import comb
from pathlib import Path

import numpy as np
from PIL import Image

THUMB = 32
BUCKET_CAP = 64  # entries read per probed bucket (uniform hashes at 24 M: mean 11.4, above 64 w.p. 1e-27)
CONFIRM_CAP = 256  # thumbnails compared per lookup
DESIGN_N = 24_000_000  # the band layout is chosen so that buckets stay small at paper scale
MAX_PROBES = 4096
_CHUNK = 400  # probes per statement: SQLite allows at most 500 terms in one compound SELECT

log = logging.getLogger("mmkd")


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The 32x32 grey thumbnail near-duplicates are confirmed on."""
    return np.asarray(Image.fromarray(rgb).convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)


def _bands(phash: int, bits: int) -> list[int]:
    """The `bits + 1` exact-match bands (pigeonhole at radius 0), used by the contamination check's in-RAM index."""
    n = bits + 1
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [(phash >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v  # SQLite integers are signed 64-bit


@lru_cache(maxsize=None)
def layout(bits: int) -> tuple[tuple[tuple[int, int, tuple[int, ...]], ...], int]:
    """((lo, width, flip masks) per band, probes) for radius `bits`: of the layouts with m = 1..bits+1 bands and
    at most MAX_PROBES probes, the one with the fewest probes plus expected bucket entries at DESIGN_N records."""
    best = None
    for m in range(1, bits + 2):
        edges = [round(i * 64 / m) for i in range(m + 1)]
        s = bits // m
        widths = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
        probes = sum(comb(w, k) for w in widths for k in range(s + 1))
        cost = sum(comb(w, k) * (1 + DESIGN_N / 2 ** w) for w in widths for k in range(s + 1))
        if best is None or (probes > MAX_PROBES, cost) < best[0]:
            best = ((probes > MAX_PROBES, cost), edges, widths, s, probes)
    _, edges, widths, s, probes = best
    bands = tuple((lo, w, tuple(sum(1 << b for b in c) for k in range(s + 1) for c in combinations(range(w), k)))
                  for lo, w in zip(edges[:-1], widths))
    return bands, probes


def band_values(phash: int, bits: int) -> list[int]:
    """The value of each of `layout(bits)`'s bands: what a record is stored under."""
    return [(phash >> lo) & ((1 << w) - 1) for lo, w, _ in layout(bits)[0]]


@lru_cache(maxsize=None)
def _probe_arrays(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: band number, shift, width mask and flip mask (uint64), so a lookup's probes are 4 array ops."""
    rows = [(b, lo, (1 << w) - 1, mask) for b, (lo, w, masks) in enumerate(layout(bits)[0]) for mask in masks]
    band, lo, width, mask = zip(*rows)
    return (np.array(band, np.int64), np.array(lo, np.uint64), np.array(width, np.uint64), np.array(mask, np.uint64))


def probe_params(phash: int, bits: int) -> np.ndarray:
    """[probes, 2] (band, value as SQLite's signed integer) of every bucket that can hold a hash within `bits`
    differing bits of phash."""
    band, lo, width, mask = _probe_arrays(bits)
    out = np.empty((len(band), 2), np.int64)
    out[:, 0] = band
    out[:, 1] = (((np.uint64(phash) >> lo) & width) ^ mask).view(np.int64)
    return out


def probes(phash: int, bits: int) -> list[tuple[int, int]]:
    """probe_params as (band, value) tuples."""
    return [tuple(p) for p in probe_params(phash, bits).tolist()]


@lru_cache(maxsize=None)
def _probe_sql(n: int, cap: int) -> str:
    one = "SELECT * FROM (SELECT {i}, rid, phash FROM bands WHERE band=? AND value=? ORDER BY rid LIMIT {cap})"
    return " UNION ALL ".join(one.format(i=i, cap=cap + 1) for i in range(n))  # cap + 1: tells a full bucket


class CurationIndex:
    def __init__(self, near_bits: int, max_diff: float, folder: Path | None = None,
                 bucket_cap: int = BUCKET_CAP, confirm_cap: int = CONFIRM_CAP):
        self.tmp = tempfile.TemporaryDirectory(prefix="mmkd-curate-", dir=folder)
        self.db = sqlite3.connect(Path(self.tmp.name) / "index.sqlite", isolation_level=None)
        # bands: one row per (band, value, record), the record's pHash beside it, so that a probe is one range of
        # the primary key read in rid order and the Hamming distances need no second table
        self.db.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2000; PRAGMA temp_store=FILE;
            CREATE TABLE ids (id TEXT PRIMARY KEY, at TEXT);
            CREATE TABLE content (hash TEXT PRIMARY KEY, id TEXT);
            CREATE TABLE bands (band INTEGER, value INTEGER, rid INTEGER, phash INTEGER,
                                PRIMARY KEY (band, value, rid)) WITHOUT ROWID;
            CREATE TABLE images (rid INTEGER PRIMARY KEY, id TEXT, phash INTEGER, thumb BLOB);
            CREATE TABLE groups (token TEXT PRIMARY KEY, split TEXT);
        """)
        self.db.execute("BEGIN")
        self.near_bits, self.max_diff = near_bits, max_diff
        self.bucket_cap, self.confirm_cap = bucket_cap, confirm_cap
        # lookups, lookups where a cap bound, rows read from buckets, thumbnails compared: the work done
        self.stats = {"lookups": 0, "cap_hits": 0, "rows": 0, "confirmed": 0}

    @property
    def cap_hits(self) -> int:
        return self.stats["cap_hits"]

    def close(self) -> None:
        if self.stats["cap_hits"]:
            log.warning("near duplicates: a work cap bound on %d of %d lookups (crowded pHash buckets); a near "
                        "duplicate there may be missed", self.stats["cap_hits"], self.stats["lookups"])
        self.db.close()
        self.tmp.cleanup()

    def id_seen(self, rid: str) -> str | None:
        row = self.db.execute("SELECT at FROM ids WHERE id=?", (rid,)).fetchone()
        return row[0] if row else None

    def content_seen(self, digest: str) -> str | None:
        row = self.db.execute("SELECT id FROM content WHERE hash=?", (digest,)).fetchone()
        return row[0] if row else None

    def _candidates(self, phash: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(rids, pHashes) of the earliest `bucket_cap` entries of every probed bucket, and whether a bucket held
        more. Work: probes x (log n + bucket_cap) rows, whatever the corpus size."""
        todo = probe_params(phash, self.near_bits)
        parts = []
        for at in range(0, len(todo), _CHUNK):
            part = todo[at:at + _CHUNK]
            rows = self.db.execute(_probe_sql(len(part), self.bucket_cap), part.ravel().tolist()).fetchall()
            if rows:
                got = np.array(rows, dtype=np.int64)  # columns: probe (within its statement), rid, phash
                got[:, 0] += at
                parts.append(got)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64), False
        got = np.concatenate(parts)
        self.stats["rows"] += len(got)
        probe = got[:, 0]
        order = np.lexsort((got[:, 1], probe))
        got, probe = got[order], probe[order]
        first = np.searchsorted(probe, probe, side="left")
        keep = np.arange(len(got)) - first < self.bucket_cap  # the (cap + 1)-th row only says the bucket was full
        rids, at = np.unique(got[keep, 1], return_index=True)
        return rids, got[keep, 2][at].view(np.uint64), bool((~keep).any())

    def near_duplicate(self, phash: int, thumb: np.ndarray) -> tuple[str, float] | None:
        """(id, difference) of the earliest near-identical image among those examined, or None. Every image
        within `near_bits` of phash is examined unless a cap binds (`stats["cap_hits"]`)."""
        if self.near_bits < 0:
            return None
        self.stats["lookups"] += 1
        rids, other, full = self._candidates(phash)
        ham = np.bitwise_count(other ^ np.uint64(phash))
        close = ham <= self.near_bits
        rids, ham = rids[close], ham[close]
        if len(rids) > self.confirm_cap:  # the nearest in pHash first, earliest among equals
            full = True
            pick = np.lexsort((rids, ham))[:self.confirm_cap]
            rids = np.sort(rids[pick])
        self.stats["cap_hits"] += full
        if not len(rids):
            return None
        self.stats["confirmed"] += len(rids)
        found = self.db.execute(f"SELECT rid, id, thumb FROM images WHERE rid IN ({','.join('?' * len(rids))}) "
                                "ORDER BY rid", [int(r) for r in rids]).fetchall()
        thumbs = np.stack([np.frombuffer(r[2], np.uint8) for r in found]).astype(np.int16)
        diff = np.abs(thumbs - thumb.astype(np.int16).ravel()).mean(axis=1)
        hit = np.flatnonzero(diff <= self.max_diff)  # earliest first: the record met first is the one kept
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
            self.db.executemany("INSERT INTO bands VALUES (?, ?, ?, ?)",
                                [(b, _signed(v), cur.lastrowid, _signed(phash))
                                 for b, v in enumerate(band_values(phash, self.near_bits))])
        self.db.execute("INSERT OR IGNORE INTO groups VALUES (?, ?)", (token, split))
