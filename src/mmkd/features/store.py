"""Owns the feature store: fixed-size shards of memory-mappable arrays and the index that finds a sample's row.

Layout of a store folder (artifacts/features/teachers for raw teacher features, .../aligned for projections):
  index.sqlite                       sets(teacher, version, dim, dtype, meta), shards(id, teacher, version, unit,
                                     rows, sums), runs(id, teacher, version, level, rows, sums)
  keyindex/<teacher>/<version>/<run>.keys, .loc, .fence   the key index: sorted runs of content hash -> (shard,
                                     row), 24 bytes a row (keyindex.py)
  shards/<teacher>/<version>/<unit>.image.npy   [n, dim] L2-normalised image embeddings (float16 or float32)
  shards/<teacher>/<version>/<unit>.text.npy    [n, dim] caption embeddings, same rows
  shards/<teacher>/<version>/<unit>.sums.json   size and sha256 of the three files, as the writer wrote them
  shards/<teacher>/<version>/<unit>.keys.npy    [n] the samples' content hashes (the curated `key`), written last
A shard becomes visible only when whole: its files are written under .tmp names and renamed, keys last; its
checksums and its key index run enter the index in one transaction afterwards. A kill in between leaves a complete
shard the index does not list yet; `adopt` checks it against its sums and commits it on the next run. Rows are keyed
by (content hash, teacher, version), so a re-curated corpus or a retrained teacher never reads stale features.
A shard is checked when this process first opens it (`arrays`): sizes, headers and sha256 against the index; a key
index run when first searched (sizes, and sha256 with hash_on_open); `locate` confirms each answer against the
shard's keys.npy (checked against its sums first). A flipped byte or a truncated file is a FeatureError naming the
file. `verify` checks every shard and run whatever this process has already checked (checks.py), and that the key
index finds every shard's keys at their rows. An index from before the key index (a SQLite `rows` table, ~72 bytes
a row, its inserts and lookups slowing down past a few million rows) is converted when first opened.
"""

from __future__ import annotations

import json
import logging
import mmap
import sqlite3
from pathlib import Path

import numpy as np

from mmkd.features.checks import (FeatureError, KEY_DTYPE, add_checksums, check_shard,  # noqa: F401
                                  read_sums, set_digest, sums_of_files)
from mmkd.features.keyindex import KeyIndex
from mmkd.features.rows import RowReader
from mmkd.features.upkeep import StoreUpkeep
from mmkd.features.shards import DTYPES, ShardWriter, validate_rows, write_shard  # noqa: F401 (the store's API)
from mmkd.features.reader import TeacherFeatures  # noqa: F401 (the store's API)

log = logging.getLogger("mmkd")
PARTS = (".image.npy", ".text.npy", ".sums.json")  # a shard's files but keys.npy, which is renamed last


class FeatureStore(StoreUpkeep):
    """One store folder: its SQLite index and shard files. Open with create=True to make it.

    hash_on_open: check each shard's sha256 when this process first opens it (else sizes, headers and keys only;
    `verify` always hashes)."""

    def __init__(self, root: Path, create: bool = False, hash_on_open: bool = True):
        self.root = Path(root)
        if not (self.root / "index.sqlite").exists() and not create:
            raise FeatureError(f"{self.root}: no feature store here (index.sqlite missing); run the step that "
                               "fills it (cache_features, align) first")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS sets (teacher TEXT, version TEXT, dim INTEGER, dtype TEXT, meta TEXT,
                                             PRIMARY KEY (teacher, version));
            CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, teacher TEXT, version TEXT, unit TEXT,
                                               rows INTEGER, UNIQUE (teacher, version, unit));
        """)
        self.hash_on_open = hash_on_open
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._mmaps: list[np.memmap] = []
        self._keys_ok: set[int] = set()  # shards whose keys.npy `confirm` checked
        self._checked: dict[int, Path] = {}  # shards checked on first open -> their path prefix
        self.rows = RowReader()
        if "sums" not in {c[1] for c in self.db.execute("PRAGMA table_info(shards)")}:
            add_checksums(self.db, self._prefix)
        self.index = KeyIndex(self.db, self.root, hash_on_open)
        self.db.commit()
        if self.db.execute("SELECT name FROM sqlite_master WHERE name='rows'").fetchone():
            self._convert()

    def _convert(self) -> None:
        """An index written before the key index: build each set's runs from its shards' keys.npy (the files the
        rows table was made from, checked against their sums), then drop the rows table, in one transaction."""
        self.db.execute("BEGIN IMMEDIATE")  # one process converts; another waits, then finds no rows table
        try:
            if self.db.execute("SELECT name FROM sqlite_master WHERE name='rows'").fetchone():
                for s in self.sets():
                    self.rebuild_index(s["teacher"], s["version"])
                self.db.execute("DROP TABLE rows")
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        for s in self.sets():
            self.index.compact(s["teacher"], s["version"])

    def reindex(self, teacher: str, version: str) -> None:
        """Rebuild a set's key index from its shards' keys.npy (a damaged or lost run)."""
        with self.db:
            old = self.rebuild_index(teacher, version)
        self.index.remove_files(teacher, version, old)
        self.index.compact(teacher, version)

    def _prefix(self, teacher: str, version: str, unit: str) -> Path:
        return self.root / "shards" / teacher / version / unit

    def close(self) -> None:
        self.release()
        self.rows.close()
        self.db.close()

    # ------------------------------------------------------------------ sets and index

    def register_set(self, teacher: str, version: str, dim: int, dtype: str, meta: dict | None = None) -> None:
        row = self.db.execute("SELECT dim, dtype, meta FROM sets WHERE teacher=? AND version=?",
                              (teacher, version)).fetchone()
        if row and (row[0], row[1]) != (dim, dtype):
            raise FeatureError(f"teacher '{teacher}' version {version}: the store holds dim {row[0]} {row[1]}, "
                               f"now {dim} {dtype}; a changed `features.dtype` needs a fresh store")
        if row and row[2] == json.dumps(meta or {}, sort_keys=True):
            return  # unchanged: no write, so a run with nothing to add leaves the store's bytes (and DVC) as they were
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO sets VALUES (?,?,?,?,?)",
                            (teacher, version, dim, dtype, json.dumps(meta or {}, sort_keys=True)))

    def sets(self) -> list[dict]:
        cur = self.db.execute("SELECT teacher, version, dim, dtype, meta FROM sets ORDER BY teacher, version")
        return [{"teacher": t, "version": v, "dim": d, "dtype": dt, "meta": json.loads(m)} for t, v, d, dt, m in cur]

    def set_info(self, teacher: str, version: str) -> dict:
        for s in self.sets():
            if (s["teacher"], s["version"]) == (teacher, version):
                return s
        have = ", ".join(f"{s['teacher']}@{s['version']}" for s in self.sets()) or "nothing"
        raise FeatureError(f"{self.root}: no features of teacher '{teacher}' version {version} (the store holds "
                           f"{have}); run cache_features")

    def present(self, teacher: str, version: str, keys: list[str]) -> set[str]:
        """Which of `keys` (hex) already have features of this teacher version."""
        if not len(keys):
            return set()
        shard, _ = self.index.lookup(teacher, version, np.array(keys, dtype=KEY_DTYPE))
        return {k for k, s in zip(keys, shard.tolist()) if s >= 0}

    def commit(self, teacher: str, version: str, unit: str, hashed: bool = False) -> int:
        """Enter a written shard's rows and checksums into the index (idempotent); returns its row count. The shard
        is checked against the writer's sums first (sizes and headers; sha256 too if `hashed`)."""
        prefix = self._prefix(teacher, version, unit)
        info = self.set_info(teacher, version)
        try:
            keys = np.load(f"{prefix}.keys.npy")
            sums = read_sums(prefix)
            if sums is None:  # written before checksums existed: recorded from its bytes, if they check out
                sums = sums_of_files(prefix, len(keys), info["dim"], info["dtype"])
        except (ValueError, OSError) as exc:
            raise FeatureError(f"shard {prefix}: {exc}") from None
        problems = check_shard(prefix, len(keys), info["dim"], info["dtype"], sums, hashed)
        if problems:
            raise FeatureError(f"shard {prefix} cannot be committed: " + "; ".join(problems))
        with self.db:
            cur = self.db.execute("INSERT OR IGNORE INTO shards (teacher, version, unit, rows, sums) VALUES "
                                  "(?,?,?,?,?)", (teacher, version, unit, len(keys), json.dumps(sums, sort_keys=True)))
            if cur.rowcount:  # new: its run is written and listed in this transaction (listed already: nothing to do)
                self.index.add(teacher, version, cur.lastrowid, keys)
        if cur.rowcount:
            self.index.compact(teacher, version)
        return len(keys)

    def adopt(self) -> dict:
        """After a kill: commit whole shards the index does not list (if their bytes match their sums; else they
        are deleted, and the next plan recomputes their rows), delete half-written files (.tmp, or the files of a
        shard whose keys.npy never appeared)."""
        listed = {(t, v, u) for t, v, u in self.db.execute("SELECT teacher, version, unit FROM shards")}
        known = {(s["teacher"], s["version"]) for s in self.sets()}
        adopted, removed, discarded = 0, 0, 0
        for keys_file in sorted((self.root / "shards").glob("*/*/*.keys.npy")):
            teacher, version, unit = keys_file.parent.parent.name, keys_file.parent.name, keys_file.name[:-9]
            if (teacher, version, unit) not in listed and (teacher, version) in known:
                try:
                    self.commit(teacher, version, unit, hashed=True)
                    adopted += 1
                except FeatureError as exc:
                    log.warning("feature store %s: deleting an uncommitted damaged shard: %s", self.root, exc)
                    for f in keys_file.parent.glob(f"{unit}.*"):
                        f.unlink()
                    discarded += 1
        for tmp in (self.root / "shards").glob("*/*/*.tmp"):
            tmp.unlink()
            removed += 1
        for part in (self.root / "shards").glob("*/*/*"):  # written before keys.npy, which never came
            unit = next((part.name[: -len(s)] for s in PARTS if part.name.endswith(s)), None)
            if unit is not None and not (part.parent / f"{unit}.keys.npy").exists():
                part.unlink()
                removed += 1
        removed += self.index.sweep()
        out = {"adopted_shards": adopted, "removed_partial_files": removed}
        return {**out, "discarded_shards": discarded} if discarded else out

    def prune(self, keep: set[tuple[str, str]]) -> list[str]:
        """Drop feature sets not in `keep` (a retrained teacher's old version), files and index rows."""
        gone = []
        for s in self.sets():
            if (s["teacher"], s["version"]) in keep:
                continue
            with self.db:
                for table in ("runs", "shards", "sets"):
                    self.db.execute(f"DELETE FROM {table} WHERE teacher=? AND version=?", (s["teacher"], s["version"]))
            self._maps.clear()
            self._mmaps.clear()
            self._checked.clear()
            self.rows.close()
            for folder in (self.root / "shards" / s["teacher"] / s["version"],
                           self.root / "keyindex" / s["teacher"] / s["version"]):
                for f in folder.glob("*"):
                    f.unlink()
                if folder.exists():
                    folder.rmdir()
            gone.append(f"{s['teacher']}@{s['version']}")
        self._maps.clear()
        return gone

    # ------------------------------------------------------------------ reading

    def locate(self, teacher: str, version: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard id and row of each key (S32 array); -1 where this teacher version has no features for it."""
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        shard, row = self.index.lookup(teacher, version, keys)
        self.confirm(keys, shard, row)
        return shard, row

    def _shard(self, shard_id: int) -> tuple[str, str, str, int, dict | None]:
        row = self.db.execute("SELECT teacher, version, unit, rows, sums FROM shards WHERE id=?",
                              (int(shard_id),)).fetchone()
        if row is None:
            raise FeatureError(f"{self.root}: the index lists rows of shard {shard_id}, but no such shard")
        t, v, u, n, sums = row
        return t, v, u, n, json.loads(sums) if sums else None

    def check(self, shard_id: int, hashed: bool = True) -> list[str]:
        """What is wrong with one shard: its files against the index's sums (sha256 if `hashed`; keys.npy's is
        the one its key index run was made from); each problem names the file."""
        t, v, u, n, sums = self._shard(shard_id)
        info = self.set_info(t, v)
        return check_shard(self._prefix(t, v, u), n, info["dim"], info["dtype"], sums, hashed)

    def shard_keys(self, shard_id: int) -> np.ndarray:
        """The S32 keys of one shard's rows, once the shard passed its check."""
        self.arrays(shard_id)
        t, v, u, _, _ = self._shard(shard_id)
        return np.load(f"{self._prefix(t, v, u)}.keys.npy")

    def checked(self, shard_id: int) -> Path:
        """The path prefix of one shard, checked the first time this process asks (FeatureError if damaged)."""
        if shard_id not in self._checked:
            problems = self.check(shard_id, self.hash_on_open)
            t, v, u, _, _ = self._shard(shard_id)
            if problems:
                raise FeatureError(f"feature shard {t}@{v}/{u} of {self.root} is damaged: " + "; ".join(problems)
                                   + ". Its rows must be recomputed: `mmkd verify --repair` drops damaged shards, "
                                   "then re-run cache_features (raw store) or align (aligned store)")
            self._checked[shard_id] = self._prefix(t, v, u)
        return self._checked[shard_id]

    def arrays(self, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) of one shard, memory-mapped read-only (for passes over whole shards, which release the
        pages as they go; scattered rows: `gather`); checked the first time (FeatureError if damaged)."""
        if shard_id not in self._maps:
            prefix = self.checked(shard_id)
            maps = (np.load(f"{prefix}.image.npy", mmap_mode="r"), np.load(f"{prefix}.text.npy", mmap_mode="r"))
            self._mmaps.extend(maps)
            # plain ndarray views of the maps: indexing them skips np.memmap's per-call subclass overhead
            self._maps[shard_id] = tuple(np.asarray(m) for m in maps)
        return self._maps[shard_id]

    def release(self) -> None:
        """Drop this process's resident pages of the mapped shards (they stay in the page cache), so that
        reading a corpus 10x larger does not show up as 10x RSS."""
        for m in self._mmaps:
            mm = getattr(m, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)

    def gather(self, shard: np.ndarray, row: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [n, dim] image and text rows at (shard, row); zeros where shard == -1. Read with pread
        (features.rows): scattered rows through the maps would put whole shards in this process's RSS."""
        img = np.zeros((len(shard), dim), np.float32)
        txt = np.zeros((len(shard), dim), np.float32)
        order = np.argsort(shard, kind="stable")
        ordered = shard[order]
        ids, starts = np.unique(ordered, return_index=True)
        for s, a, b in zip(ids, starts, [*starts[1:], len(order)]):
            if s < 0:
                continue
            sel = order[a:b]
            prefix = self.checked(int(s))
            img[sel] = self.rows.read(f"{prefix}.image.npy", row[sel])
            txt[sel] = self.rows.read(f"{prefix}.text.npy", row[sel])
        return img, txt

    def set_digest(self, teacher: str, version: str) -> str:
        """A hash of a feature set's checksums: what a training run that reads it is fingerprinted by."""
        return set_digest([json.loads(x) if x else None for (x,) in self.db.execute(
            "SELECT sums FROM shards WHERE teacher=? AND version=? ORDER BY unit", (teacher, version))])

    # ------------------------------------------------------------------ reporting

    def stats(self, keys_by_split: dict[str, np.ndarray] | None = None) -> dict:
        """Per feature set: rows, shards, bytes on disk; with keys_by_split, the coverage of each split."""
        out = {"root": str(self.root), "sets": [], "bytes": 0, "shards": 0}
        for s in self.sets():
            t, v = s["teacher"], s["version"]
            n_shards, n_rows = self.db.execute("SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM shards WHERE teacher=? "
                                               "AND version=?", (t, v)).fetchone()
            size = sum(f.stat().st_size for f in (self.root / "shards" / t / v).glob("*.npy"))
            entry = {**s, "rows": n_rows, "shards": n_shards, "bytes": size}
            if keys_by_split:
                entry["coverage"] = {sp: float((self.locate(t, v, k)[0] >= 0).mean()) if len(k) else 0.0
                                     for sp, k in keys_by_split.items()}
            out["sets"].append(entry)
            out["bytes"] += size
            out["shards"] += n_shards
        out["bytes"] += (self.root / "index.sqlite").stat().st_size
        return out
