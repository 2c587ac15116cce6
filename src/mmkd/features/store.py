"""Owns the feature store: fixed-size shards of memory-mappable arrays and the index that finds a sample's row.

Layout of a store folder (artifacts/features/teachers for raw teacher features, .../aligned for projections):
  index.sqlite                       sets(teacher, version, dim, dtype, meta), shards(id, teacher, version, unit,
                                     rows), rows(teacher, version, key -> shard, row)
  shards/<teacher>/<version>/<unit>.image.npy   [n, dim] L2-normalised image embeddings (float16 or float32)
  shards/<teacher>/<version>/<unit>.text.npy    [n, dim] caption embeddings, same rows
  shards/<teacher>/<version>/<unit>.keys.npy    [n] the samples' content hashes (the curated `key`), written last
A shard becomes visible only when whole: its three files are written under .tmp names and renamed, keys last;
its rows enter the index in one transaction afterwards. A kill in between leaves a complete shard the index
does not list yet; `adopt` commits it on the next run. Rows are keyed by (content hash, teacher, version), so
a re-curated corpus or a retrained teacher never reads stale features.
"""

from __future__ import annotations

import json
import mmap
import os
import sqlite3
from pathlib import Path

import numpy as np

KEY_DTYPE = "S32"  # the curated content hash: 32 hex characters
DTYPES = {"float16": np.float16, "float32": np.float32}


class FeatureError(RuntimeError):
    """Bad features (NaN/inf, wrong dimension), or the store lacks what a step needs; names the sample/teacher."""


def validate_rows(teacher: str, kind: str, arr: np.ndarray, dim: int, keys: np.ndarray, ids=None) -> None:
    """Reject non-finite or wrong-dimension features, naming the first bad sample."""
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise FeatureError(f"teacher '{teacher}': {kind} features have shape {tuple(arr.shape)}, expected "
                           f"[n, {dim}] (the teacher's embedding dim)")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        who = f"sample '{ids[i]}' (key {keys[i].decode()})" if ids is not None else f"key {keys[i].decode()}"
        raise FeatureError(f"teacher '{teacher}': {kind} features of {who} are not finite "
                           f"({int(bad.sum())} bad rows in this shard)")


class ShardWriter:
    """Streams one shard to disk batch by batch (memory stays one batch whatever the shard size): rows go to
    .tmp files whose .npy headers already hold the final row count; close() renames them, keys last."""

    def __init__(self, root: Path, teacher: str, version: str, unit: str, rows: int, dim: int, dtype: str):
        self.teacher, self.dim, self.rows, self.dtype = teacher, dim, rows, np.dtype(DTYPES[dtype])
        folder = Path(root) / "shards" / teacher / version
        folder.mkdir(parents=True, exist_ok=True)
        self.prefix = folder / unit
        self.keys: list[bytes] = []
        self.files = {}
        for kind in ("image", "text"):
            fh = open(self._tmp(kind), "wb")
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (rows, dim)})
            self.files[kind] = fh

    def _tmp(self, kind: str) -> Path:
        return Path(f"{self.prefix}.{kind}.npy.tmp")

    def append(self, keys, image: np.ndarray, text: np.ndarray, ids=None) -> None:
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        if not (len(keys) == len(image) == len(text)):
            raise FeatureError(f"teacher '{self.teacher}': a batch of {len(keys)} keys has {len(image)} image and "
                               f"{len(text)} text rows")
        validate_rows(self.teacher, "image", image, self.dim, keys, ids)
        validate_rows(self.teacher, "text", text, self.dim, keys, ids)
        if len(self.keys) + len(keys) > self.rows:
            raise FeatureError(f"teacher '{self.teacher}': shard {self.prefix.name} planned for {self.rows} rows")
        self.files["image"].write(np.ascontiguousarray(image, self.dtype).tobytes())
        self.files["text"].write(np.ascontiguousarray(text, self.dtype).tobytes())
        self.keys.extend(keys.tolist())

    def close(self) -> Path:
        if len(self.keys) != self.rows:
            self.abort()
            raise FeatureError(f"teacher '{self.teacher}': shard {self.prefix.name} got {len(self.keys)} of "
                               f"{self.rows} planned rows")
        for fh in self.files.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        with open(self._tmp("keys"), "wb") as fh:
            np.save(fh, np.array(self.keys, dtype=KEY_DTYPE))
            fh.flush()
            os.fsync(fh.fileno())
        for kind in ("image", "text", "keys"):  # keys last: a shard with keys.npy is whole
            os.replace(self._tmp(kind), Path(f"{self.prefix}.{kind}.npy"))
        return self.prefix

    def abort(self) -> None:
        for fh in self.files.values():
            fh.close()
        for kind in ("image", "text", "keys"):
            self._tmp(kind).unlink(missing_ok=True)


def write_shard(root: Path, teacher: str, version: str, unit: str, keys: np.ndarray, image: np.ndarray,
                text: np.ndarray, dim: int, dtype: str, ids=None) -> Path:
    """Validate and write one whole shard atomically; returns the path prefix. Not yet in the index (commit)."""
    writer = ShardWriter(root, teacher, version, unit, len(keys), dim, dtype)
    try:
        writer.append(keys, image, text, ids)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class FeatureStore:
    """One store folder: its SQLite index and shard files. Open with create=True to make it."""

    def __init__(self, root: Path, create: bool = False):
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
            CREATE TABLE IF NOT EXISTS rows (teacher TEXT, version TEXT, key BLOB, shard INTEGER, row INTEGER,
                                             PRIMARY KEY (teacher, version, key)) WITHOUT ROWID;
        """)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._mmaps: list[np.memmap] = []

    def close(self) -> None:
        self.release()
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
        out: set[str] = set()
        for i in range(0, len(keys), 900):  # SQLite's bound-variable limit
            chunk = [bytes.fromhex(k) for k in keys[i : i + 900]]
            q = f"SELECT key FROM rows WHERE teacher=? AND version=? AND key IN ({','.join('?' * len(chunk))})"
            out.update(k.hex() for (k,) in self.db.execute(q, (teacher, version, *chunk)))
        return out

    def commit(self, teacher: str, version: str, unit: str) -> int:
        """Enter a written shard's rows into the index (idempotent); returns its row count."""
        prefix = self.root / "shards" / teacher / version / unit
        keys = np.load(f"{prefix}.keys.npy")
        with self.db:
            cur = self.db.execute("INSERT OR IGNORE INTO shards (teacher, version, unit, rows) VALUES (?,?,?,?)",
                                  (teacher, version, unit, len(keys)))
            sid = cur.lastrowid if cur.rowcount else self.db.execute(
                "SELECT id FROM shards WHERE teacher=? AND version=? AND unit=?", (teacher, version, unit)).fetchone()[0]
            self.db.executemany("INSERT OR REPLACE INTO rows VALUES (?,?,?,?,?)",
                                ((teacher, version, bytes.fromhex(k.decode()), sid, i) for i, k in enumerate(keys)))
        return len(keys)

    def adopt(self) -> dict:
        """After a kill: commit whole shards the index does not list, delete half-written (.tmp) files."""
        listed = {(t, v, u) for t, v, u in self.db.execute("SELECT teacher, version, unit FROM shards")}
        known = {(s["teacher"], s["version"]) for s in self.sets()}
        adopted, removed = 0, 0
        for keys_file in sorted((self.root / "shards").glob("*/*/*.keys.npy")):
            teacher, version, unit = keys_file.parent.parent.name, keys_file.parent.name, keys_file.name[:-9]
            if (teacher, version, unit) not in listed and (teacher, version) in known:
                self.commit(teacher, version, unit)
                adopted += 1
        for tmp in (self.root / "shards").glob("*/*/*.tmp"):
            tmp.unlink()
            removed += 1
        return {"adopted_shards": adopted, "removed_partial_files": removed}

    def prune(self, keep: set[tuple[str, str]]) -> list[str]:
        """Drop feature sets not in `keep` (a retrained teacher's old version), files and index rows."""
        gone = []
        for s in self.sets():
            if (s["teacher"], s["version"]) in keep:
                continue
            with self.db:
                for table in ("rows", "shards", "sets"):
                    self.db.execute(f"DELETE FROM {table} WHERE teacher=? AND version=?", (s["teacher"], s["version"]))
            folder = self.root / "shards" / s["teacher"] / s["version"]
            for f in folder.glob("*"):
                f.unlink()
            self._maps.clear()
            self._mmaps.clear()
            if folder.exists():
                folder.rmdir()
            gone.append(f"{s['teacher']}@{s['version']}")
        self._maps.clear()
        return gone

    # ------------------------------------------------------------------ reading

    def locate(self, teacher: str, version: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard id and row of each key (S32 array); -1 where this teacher version has no features for it."""
        keys = np.asarray(keys, dtype=KEY_DTYPE)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        shard = np.full(len(keys), -1, np.int64)
        row = np.full(len(keys), -1, np.int64)
        cur = self.db.execute("SELECT key, shard, row FROM rows WHERE teacher=? AND version=?", (teacher, version))
        while batch := cur.fetchmany(65536):  # streamed: the whole index is never in memory at once
            k = np.array([b.hex().encode() for b, _, _ in batch], dtype=KEY_DTYPE)
            pos = np.searchsorted(ordered, k)
            hit = pos < len(ordered)
            hit[hit] = ordered[pos[hit]] == k[hit]
            vals = np.array([(s, r) for _, s, r in batch], dtype=np.int64)
            shard[order[pos[hit]]] = vals[hit, 0]
            row[order[pos[hit]]] = vals[hit, 1]
        return shard, row

    def arrays(self, shard_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) of one shard, memory-mapped read-only."""
        if shard_id not in self._maps:
            t, v, u = self.db.execute("SELECT teacher, version, unit FROM shards WHERE id=?", (int(shard_id),)).fetchone()
            prefix = self.root / "shards" / t / v / u
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
        """float32 [n, dim] image and text rows at (shard, row); zeros where shard == -1."""
        img = np.zeros((len(shard), dim), np.float32)
        txt = np.zeros((len(shard), dim), np.float32)
        order = np.argsort(shard, kind="stable")
        ordered = shard[order]
        ids, starts = np.unique(ordered, return_index=True)
        for s, a, b in zip(ids, starts, [*starts[1:], len(order)]):
            if s < 0:
                continue
            sel = order[a:b]
            a_img, a_txt = self.arrays(int(s))
            r = row[sel]
            img[sel], txt[sel] = a_img[r], a_txt[r]
        return img, txt

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


class TeacherFeatures:
    """Teacher features for a fixed list of samples, read by batch from the store (nothing corpus-sized in RAM
    but the per-sample locations): `batch(idx)` -> {teacher: (image, text)} and the availability mask."""

    def __init__(self, store: FeatureStore, sets: list[tuple[str, str]], keys: np.ndarray):
        self.store, self.sets = store, list(sets)
        self.names = [t for t, _ in self.sets]
        self.dims = [store.set_info(t, v)["dim"] for t, v in self.sets]
        located = [store.locate(t, v, keys) for t, v in self.sets]
        self.shard = np.stack([s for s, _ in located], axis=1)  # [N, T]
        self.row = np.stack([r for _, r in located], axis=1)
        self.available = self.shard >= 0  # [N, T]: the per-sample coverage
        self._reads = 0

    def __len__(self) -> int:
        return len(self.shard)

    def batch(self, idx: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        idx = np.asarray(idx, dtype=np.int64)
        out = {t: self.store.gather(self.shard[idx, j], self.row[idx, j], d)
               for j, (t, d) in enumerate(zip(self.names, self.dims))}
        self._reads += 1
        if self._reads % 16 == 0:
            self.store.release()
        return out

    def stacked(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, T, d] image and text (all sets of one dim, e.g. projected) and the [B, T] availability."""
        if len(set(self.dims)) != 1:
            raise FeatureError(f"feature sets of different dims {dict(zip(self.names, self.dims))} cannot be stacked")
        parts = self.batch(idx)
        img = np.stack([parts[t][0] for t in self.names], axis=1)
        txt = np.stack([parts[t][1] for t in self.names], axis=1)
        return img, txt, self.available[np.asarray(idx, dtype=np.int64)]

    def chosen(self, idx: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, d] image and text of one teacher per sample (choice: column per sample): only those rows are read."""
        idx, choice = np.asarray(idx, dtype=np.int64), np.asarray(choice, dtype=np.int64)
        dim = self.dims[0]
        if len(set(self.dims)) != 1:
            raise FeatureError(f"feature sets of different dims {dict(zip(self.names, self.dims))}")
        img, txt = np.zeros((len(idx), dim), np.float32), np.zeros((len(idx), dim), np.float32)
        for j in np.unique(choice):
            sel = np.flatnonzero(choice == j)
            img[sel], txt[sel] = self.store.gather(self.shard[idx[sel], j], self.row[idx[sel], j], dim)
        self._reads += 1
        if self._reads % 16 == 0:
            self.store.release()
        return img, txt
