"""Owns the feature store's key index: per feature set, sorted runs of (content hash -> shard, row) in flat files.

Why not a SQLite table: at 10 M rows its B-tree inserts slow down as it outgrows the cache, it costs ~72 bytes per
row, and finding a batch of keys meant streaming the whole set through Python (docs/scaling.md, *The feature index
at 10 M rows*). A run is three files in keyindex/<teacher>/<version>/: <id>.keys ([n] 16-byte content hashes,
sorted), <id>.loc ([n, 2] int32 shard id and row), 24 bytes a row, and <id>.fence (every FENCE-th key, 1/16 byte a
row), listed in index.sqlite's `runs` table with their sizes and sha256. Each commit adds its shard's run (level
0); FANOUT runs of one level are merged, streaming in blocks, into one of the next level, so a set holds at most
(FANOUT - 1) runs per level and each row is rewritten log_FANOUT(set rows / shard rows) times. Lookups search
the runs newest first: for a few keys, the fence, then one block of FENCE keys per key; for many, one sequential
pass over the run. Files are read with pread, never mapped (a mapped file's pages count in the process's RSS, and
the kernel maps them in large pieces).
Kill safety: a run's files are written under .tmp names, fsynced and renamed inside the transaction that lists
them (and, for a commit, its shard); a merge lists its output and unlists its inputs in one transaction and
deletes the inputs' files after. A kill leaves unlisted files only, which `sweep` deletes.
Entries whose shard is no longer listed (a dropped shard) are skipped by lookups and left out of every merge.
"""

from __future__ import annotations

import binascii
import json
import os
from pathlib import Path

import numpy as np

from mmkd import atomic
from mmkd.features.checks import KEY_DTYPE, FeatureError, HashingFile, file_sum

RAW = np.dtype("S16")  # the content hash's 16 bytes: numpy compares fixed-width bytes as memcmp does
FANOUT = 8
BLOCK = 1 << 16  # rows per block read while merging or streaming a run: bounds memory whatever the set's size
FENCE = 256  # a run's .fence file holds every FENCE-th key: a lookup reads it, then one block of FENCE keys per key
SEARCH_RATIO = 16  # fewer query keys than run rows / SEARCH_RATIO: fence and block reads; else one pass over the run
SEARCH_BLOCKS = 256  # blocks read at a time by a search: 1 MiB
PARTS = ("loc", "fence", "keys")  # a run's files, in the order they are renamed


def raw_keys(keys: np.ndarray) -> np.ndarray:
    """S32 hex content hashes -> S16 bytes; FeatureError naming the first key that is not 32 hex characters."""
    keys = np.ascontiguousarray(keys, dtype=KEY_DTYPE)
    try:
        return np.frombuffer(binascii.unhexlify(keys.tobytes()), dtype=RAW)
    except (binascii.Error, ValueError):
        bad = next(k for k in keys.tolist() if len(k) != 32 or not all(c in b"0123456789abcdefABCDEF" for c in k))
        raise FeatureError(f"key {bad!r} is not a content hash (32 hex characters)") from None


class KeyIndex:
    """The runs of every feature set of one store; `db` is the store's SQLite connection (the runs table)."""

    def __init__(self, db, root: Path, hashed: bool):
        self.db, self.root, self.hashed = db, Path(root), hashed
        self.db.execute("CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, teacher TEXT, "
                        "version TEXT, level INTEGER, rows INTEGER, sums TEXT)")
        self._checked: set[tuple] = set()

    def _path(self, teacher: str, version: str, run_id: int, part: str) -> Path:
        return self.root / "keyindex" / teacher / version / f"{run_id:010d}.{part}"

    def runs(self, teacher: str, version: str) -> list[tuple[int, int, int, dict]]:
        """(id, level, rows, sums) of a set's runs, newest first."""
        cur = self.db.execute("SELECT id, level, rows, sums FROM runs WHERE teacher=? AND version=? ORDER BY id DESC",
                              (teacher, version))
        return [(i, lv, n, json.loads(s)) for i, lv, n, s in cur]

    def live(self, teacher: str, version: str) -> np.ndarray:
        return np.array(sorted(i for (i,) in self.db.execute("SELECT id FROM shards WHERE teacher=? AND version=?",
                                                             (teacher, version))), dtype=np.int64)

    # ------------------------------------------------------------------ writing (inside the caller's transaction)

    def _write(self, teacher: str, version: str, level: int, blocks) -> None:
        """List a new run and write its files from `blocks` (sorted (S16 keys, [n, 2] int32) pieces)."""
        cur = self.db.execute("INSERT INTO runs (teacher, version, level, rows, sums) VALUES (?,?,?,0,'{}')",
                              (teacher, version, level))
        rid = cur.lastrowid
        folder = self._path(teacher, version, rid, "keys").parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = {p: Path(f"{self._path(teacher, version, rid, p)}.tmp") for p in PARTS}
        files = {p: HashingFile(t) for p, t in tmp.items()}
        n = 0
        try:
            for k, loc in blocks:
                files["keys"].write(np.ascontiguousarray(k, RAW).tobytes())
                files["loc"].write(np.ascontiguousarray(loc, np.int32).tobytes())
                files["fence"].write(np.ascontiguousarray(k[(-n) % FENCE :: FENCE], RAW).tobytes())
                n += len(k)
            sums = {p: f.finish() for p, f in files.items()}
        except BaseException:
            for p, f in files.items():
                f.close()
                tmp[p].unlink(missing_ok=True)
            raise
        for p in PARTS:
            os.replace(tmp[p], self._path(teacher, version, rid, p))
        atomic.fsync_dir(folder)
        self.db.execute("UPDATE runs SET rows=?, sums=? WHERE id=?", (n, json.dumps(sums, sort_keys=True), rid))

    def add(self, teacher: str, version: str, shard_id: int, keys: np.ndarray) -> None:
        """The level-0 run of one committed shard (inside the commit's transaction). A key twice in the shard
        keeps its last row."""
        raw = raw_keys(keys)
        order = np.argsort(raw, kind="stable")[::-1]  # reversed: the last of equal keys comes first
        order = order[np.argsort(raw[order], kind="stable")]
        k = raw[order]
        first = np.ones(len(k), bool)
        first[1:] = k[1:] != k[:-1]
        loc = np.stack([np.full(len(k), shard_id, np.int32), order.astype(np.int32)], axis=1)
        self._write(teacher, version, 0, [(k[first], loc[first])])

    def _read(self, teacher, version, rid, part, start, count) -> np.ndarray:
        dtype, width = (np.dtype(np.int32), 2) if part == "loc" else (RAW, 1)
        arr = np.fromfile(self._path(teacher, version, rid, part), dtype=dtype, count=count * width,
                          offset=start * dtype.itemsize * width)
        return arr if width == 1 else arr.reshape(-1, 2)

    def _merged(self, teacher: str, version: str, runs: list, live: np.ndarray):
        """Blocks of the runs (newest first) merged: sorted, one entry per key (the newest run's whose shard is
        live), entries of unlisted shards dropped. Memory: a block per run."""
        pos = [0] * len(runs)
        while True:
            active = [i for i, r in enumerate(runs) if pos[i] < r[2]]
            if not active:
                return
            blocks = {i: self._read(teacher, version, runs[i][0], "keys", pos[i], BLOCK) for i in active}
            pivot = min(b[-1] for b in blocks.values())  # every key <= pivot of every run is in these blocks
            ks, ls = [], []
            for i in active:
                end = int(np.searchsorted(blocks[i], pivot, side="right"))
                ks.append(blocks[i][:end])
                ls.append(self._read(teacher, version, runs[i][0], "loc", pos[i], end))
                pos[i] += end
            k, loc = np.concatenate(ks), np.concatenate(ls)
            keep = np.isin(loc[:, 0], live)
            k, loc = k[keep], loc[keep]
            order = np.argsort(k, kind="stable")  # stable: of equal keys the newest run's comes first
            k, loc = k[order], loc[order]
            first = np.ones(len(k), bool)
            first[1:] = k[1:] != k[:-1]
            if first.any():
                yield k[first], loc[first]

    def merge(self, teacher: str, version: str, runs: list, level: int) -> list[int]:
        """Replace `runs` by their merge (inside the caller's transaction); returns the replaced ids, whose
        files the caller deletes once the transaction committed."""
        self._write(teacher, version, level, self._merged(teacher, version, runs, self.live(teacher, version)))
        ids = [r[0] for r in runs]
        self.db.execute(f"DELETE FROM runs WHERE id IN ({','.join('?' * len(ids))})", ids)
        return ids

    def due(self, teacher: str, version: str) -> tuple[list, int] | None:
        """The oldest FANOUT runs of the lowest level that has FANOUT, and the level of their merge; None if none."""
        by_level: dict[int, list] = {}
        for r in reversed(self.runs(teacher, version)):  # oldest first
            by_level.setdefault(r[1], []).append(r)
        for level in sorted(by_level):
            if len(by_level[level]) >= FANOUT:
                return list(reversed(by_level[level][:FANOUT])), level + 1
        return None

    def compact(self, teacher: str, version: str) -> None:
        """Merge runs while some level holds FANOUT of them, one transaction per merge."""
        while due := self.due(teacher, version):
            with self.db:
                gone = self.merge(teacher, version, *due)
            self.remove_files(teacher, version, gone)

    def remove_files(self, teacher: str, version: str, ids: list[int]) -> None:
        for rid in ids:
            for p in PARTS:
                self._path(teacher, version, rid, p).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Delete run files no run lists (a kill's leftovers: .tmp files, a merge's inputs or an unlisted
        output); only for the one process that writes the store."""
        listed = {(t, v, f"{i:010d}") for i, t, v in self.db.execute("SELECT id, teacher, version FROM runs")}
        removed = 0
        for f in (self.root / "keyindex").glob("*/*/*"):
            if (f.parent.parent.name, f.parent.name, f.name.split(".")[0]) not in listed or f.name.endswith(".tmp"):
                f.unlink()
                removed += 1
        return removed

    # ------------------------------------------------------------------ reading

    def check(self, teacher: str, version: str, run: tuple, hashed: bool) -> list[str]:
        """Problems of one run's files against their record (size; sha256 if `hashed`), each naming the file."""
        rid, _, n, sums = run
        out = []
        for part, size in (("keys", 16 * n), ("loc", 8 * n), ("fence", 16 * -(-n // FENCE))):
            path = self._path(teacher, version, rid, part)
            if not path.exists():
                out.append(f"{path}: missing (key index run of {n} rows)")
            elif path.stat().st_size != size or path.stat().st_size != sums[part]["bytes"]:
                out.append(f"{path}: {path.stat().st_size} bytes, the index recorded {size} (truncated)")
            elif hashed and (got := file_sum(path)["sha256"]) != sums[part]["sha256"]:
                out.append(f"{path}: sha256 {got[:16]}... differs from the index's {sums[part]['sha256'][:16]}...")
        return out

    def _opened(self, teacher: str, version: str, run: tuple) -> None:
        if (teacher, version, run[0]) in self._checked:
            return
        for part in PARTS:  # listed but gone: maybe merged away since it was listed (lookup lists again)
            if not self._path(teacher, version, run[0], part).exists():
                raise FileNotFoundError(2, "missing", str(self._path(teacher, version, run[0], part)))
        problems = self.check(teacher, version, run, self.hashed)
        if problems:
            raise FeatureError(f"the key index of {teacher}@{version} in {self.root} is damaged: "
                               + "; ".join(problems) + ". `mmkd verify --repair` rebuilds it from the shards")
        self._checked.add((teacher, version, run[0]))

    def lookup(self, teacher: str, version: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard id and row of each key (S32); -1 where the set has no live entry for it."""
        for attempt in range(3):
            try:
                return self._lookup(teacher, version, keys)
            except FileNotFoundError as exc:  # a writer merged runs (and deleted their files) while this read them
                if attempt == 2:
                    raise FeatureError(f"the key index of {teacher}@{version} in {self.root}: {exc.filename} is "
                                       "missing. `mmkd verify --repair` rebuilds it from the shards") from None
        raise AssertionError("unreachable")

    def _lookup(self, teacher: str, version: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uq, inverse = np.unique(raw_keys(keys), return_inverse=True)  # sorted once; a key asked twice answered twice
        found = np.full((len(uq), 2), -1, np.int64)
        live = self.live(teacher, version)
        for run in self.runs(teacher, version):  # newest first: the first live entry of a key is its answer
            todo = np.flatnonzero(found[:, 0] < 0)
            if not len(todo):
                break
            self._opened(teacher, version, run)
            if run[2] and len(todo) * SEARCH_RATIO < run[2]:
                self._search(teacher, version, run, uq, todo, found, live)
            elif run[2]:
                self._scan(teacher, version, run, uq, found, live)
        got = found[inverse.reshape(-1)]
        return got[:, 0], got[:, 1]

    def _search(self, teacher, version, run, uq, todo, found, live) -> None:
        """Few keys: the run's fence (every FENCE-th key) names the one block of FENCE keys that may hold each key;
        one pread per block, a vectorised binary search in SEARCH_BLOCKS blocks at a time, one pread per hit for
        its (shard, row). Nothing is mapped: a mapped file's pages count in RSS, and the kernel maps them in large
        pieces."""
        rid, _, n, _ = run
        fence = self._read(teacher, version, rid, "fence", 0, -(-n // FENCE))
        blk = np.searchsorted(fence, uq[todo], side="right") - 1  # -1: before the run's first key, not in it
        todo, blk = todo[blk >= 0], blk[blk >= 0]
        if not len(todo):
            return
        blocks, first = np.unique(blk, return_index=True)  # blk is sorted: each block's keys are one slice
        with open(self._path(teacher, version, rid, "keys"), "rb", buffering=0) as fk, \
                open(self._path(teacher, version, rid, "loc"), "rb", buffering=0) as fl:
            for c in range(0, len(blocks), SEARCH_BLOCKS):  # memory: SEARCH_BLOCKS blocks whatever the query
                a, e = first[c], first[c + SEARCH_BLOCKS] if c + SEARCH_BLOCKS < len(blocks) else len(todo)
                self._search_blocks(fk, fl, blocks[c : c + SEARCH_BLOCKS], blk[a:e], uq, todo[a:e], found, live)

    @staticmethod
    def _search_blocks(fk, fl, blocks, blk, uq, todo, found, live) -> None:
        parts = [os.pread(fk.fileno(), FENCE * RAW.itemsize, b * FENCE * RAW.itemsize) for b in blocks.tolist()]
        short = FENCE - len(parts[-1]) // RAW.itemsize  # the run's last block may be short: padded with its last key
        parts[-1] += parts[-1][-RAW.itemsize :] * short
        kb = np.frombuffer(b"".join(parts), RAW).reshape(len(blocks), FENCE)
        which = np.searchsorted(blocks, blk)
        q, lo, hi = uq[todo], np.zeros(len(todo), np.int64), np.full(len(todo), FENCE, np.int64)
        while (lo < hi).any():  # log2(FENCE) steps
            mid = (lo + hi) // 2
            less = kb[which, np.minimum(mid, FENCE - 1)] < q
            lo, hi = np.where((lo < hi) & less, mid + 1, lo), np.where((lo < hi) & ~less, mid, hi)
        hit = np.flatnonzero(kb[which, np.minimum(lo, FENCE - 1)] == q)
        if not len(hit):
            return
        at = (blocks[which[hit]] * FENCE + lo[hit]).tolist()
        loc = np.frombuffer(b"".join(os.pread(fl.fileno(), 8, i * 8) for i in at), np.int32).reshape(-1, 2)
        ok = np.isin(loc[:, 0], live)
        found[todo[hit[ok]]] = loc[ok]

    def _scan(self, teacher, version, run, uq, found, live) -> None:
        """Many keys: one pass over the run in blocks read with pread (nothing mapped), each matched against the
        sorted keys; only keys not found in a newer run take the entry."""
        rid, _, n, _ = run
        for a in range(0, n, BLOCK):
            k = self._read(teacher, version, rid, "keys", a, BLOCK)
            # both sides sorted: search the shorter in the longer (string comparisons are the cost)
            lo, hi = np.searchsorted(uq, k[[0, -1]]), np.searchsorted(uq, k[-1], side="right")
            q = uq[lo[0] : hi]
            if not len(q):
                continue
            if len(q) < len(k):
                pos = np.minimum(np.searchsorted(k, q), len(k) - 1)
                qi = np.flatnonzero(k[pos] == q)
                at, qi = pos[qi], lo[0] + qi
            else:
                pos = np.minimum(np.searchsorted(q, k), len(q) - 1)
                at = np.flatnonzero(q[pos] == k)
                qi = lo[0] + pos[at]
            new = found[qi, 0] < 0
            at, qi = at[new], qi[new]
            if len(at):
                loc = self._read(teacher, version, rid, "loc", a, len(k))[at]
                ok = np.isin(loc[:, 0], live)
                found[qi[ok]] = loc[ok]
