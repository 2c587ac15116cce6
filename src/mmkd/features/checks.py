"""Owns the feature store's shard checksums: hashing shard files as they are written, and checking a shard's files
against what the index recorded (presence, size, .npy header, sha256, keys).

A shard's record ("sums") is {kind: {"bytes": n, "sha256": hex}} for kind in image, text, keys, computed by the
writer from the bytes it wrote (never re-read), kept beside the shard in `<unit>.sums.json` until the shard is
committed, then in the index (`shards.sums`). A flipped byte changes the sha256; a truncated or extended file
changes the size and usually the header's arithmetic; both name the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("mmkd")
KINDS = ("image", "text", "keys")
SUMS_SUFFIX = ".sums.json"
KEY_DTYPE = "S32"  # the curated content hash: 32 hex characters
_BLOCK = 1 << 20
# files this process already hashed and found right, by identity and state: re-opening a store (a second
# FeatureStore of the same folder, a later step in the same process) does not hash the same bytes again
_VERIFIED: set[tuple] = set()


class FeatureError(RuntimeError):
    """Bad features (NaN/inf, wrong dimension), or the store lacks what a step needs; names the sample/teacher."""


class HashingFile:
    """A file being written whose bytes are hashed and counted on their way to disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh = open(self.path, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        n = self.fh.write(data)
        self.hash.update(data)
        self.size += len(memoryview(data).cast("B"))
        return n

    def finish(self) -> dict:
        """Flush to disk, close; returns the file's record."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"bytes": self.size, "sha256": self.hash.hexdigest()}

    def close(self) -> None:
        self.fh.close()


def file_sum(path: Path) -> dict:
    h, size = hashlib.sha256(), 0
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:  # block reads: the file never sits in this process's memory whole
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, "sha256": h.hexdigest()}


def sums_path(prefix: Path) -> Path:
    return Path(f"{prefix}{SUMS_SUFFIX}")


def read_sums(prefix: Path) -> dict | None:
    """The writer's record of a shard not yet committed; None for a shard written before checksums existed."""
    path = sums_path(prefix)
    if not path.exists():
        return None
    sums = json.loads(path.read_text())
    if set(sums) != set(KINDS):
        raise ValueError(f"{path}: lists {sorted(sums)}, expected {list(KINDS)}")
    return sums


def _header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file, or ValueError saying what is wrong with it."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"npy format {version}")
            shape, fortran, dtype = read[version](fh)
        except Exception as exc:  # numpy says ValueError or EOFError, with no file name: ours adds it
            raise ValueError(f"unreadable .npy header ({exc})") from None
        if fortran:
            raise ValueError("fortran-ordered array (the store writes C order)")
        return shape, dtype, fh.tell()


def check_file(path: Path, shape: tuple, dtype: np.dtype, recorded: dict | None, hashed: bool) -> list[str]:
    """What is wrong with one shard file, each problem naming it; [] if it is right."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"{path}: missing"]
    if recorded is not None and st.st_size != recorded["bytes"]:
        return [f"{path}: {st.st_size} bytes, the index recorded {recorded['bytes']} (truncated or overwritten)"]
    try:
        got_shape, got_dtype, offset = _header(path)
    except ValueError as exc:
        return [f"{path}: {exc}"]
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype):
        return [f"{path}: holds {got_dtype} {tuple(got_shape)}, the index expects {np.dtype(dtype)} {tuple(shape)}"]
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if st.st_size != need:
        return [f"{path}: {st.st_size} bytes, its header needs {need} (truncated or extended)"]
    if hashed and recorded is not None:
        ident = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, recorded["sha256"])
        if ident not in _VERIFIED:
            got = file_sum(path)["sha256"]
            if got != recorded["sha256"]:
                return [f"{path}: sha256 {got[:16]}... differs from the index's {recorded['sha256'][:16]}... "
                        "(the bytes changed after they were written)"]
            _VERIFIED.add(ident)
    return []


def check_shard(prefix: Path, rows: int, dim: int, dtype: str, sums: dict | None, hashed: bool = True) -> list[str]:
    """Problems of a shard's three files against its record (sizes and headers always, sha256 if `hashed`); a
    shard without a record (one the checksum migration refused) is a problem, saying why it was refused."""
    out = []
    for kind in ("image", "text"):
        out += check_file(Path(f"{prefix}.{kind}.npy"), (rows, dim), np.dtype(dtype), sums and sums[kind], hashed)
    out += check_file(Path(f"{prefix}.keys.npy"), (rows,), np.dtype(KEY_DTYPE), sums and sums["keys"], hashed)
    if sums is None and not out:
        try:
            sums_of_files(prefix, rows, dim, dtype)
            why = "its bytes check out now, but did not when checksums were introduced"
        except ValueError as exc:
            why = str(exc)
        out.append(f"{prefix}.*.npy: no checksum in the index ({why})")
    return out


def check_keys(path: Path, n: int, index_rows) -> list[str]:
    """keys.npy against the index: its `n` keys, and every (key, row) the index lists for the shard (a cursor,
    read in blocks) naming the key at that row."""
    keys = np.load(path)
    found, wrong, first = 0, 0, None
    while batch := index_rows.fetchmany(65536):
        k = np.array([b.hex().encode() for b, _ in batch], dtype=KEY_DTYPE)
        r = np.array([r for _, r in batch], dtype=np.int64)
        ok = (r >= 0) & (r < len(keys))
        bad = ~ok
        bad[ok] = keys[r[ok]] != k[ok]
        if bad.any() and first is None:
            i = int(np.flatnonzero(bad)[0])
            first = f"e.g. row {r[i]} is {k[i].decode()} in the index"
        found, wrong = found + len(batch), wrong + int(bad.sum())
    out = []
    if len(keys) != n or found != n:
        out.append(f"{path}: {len(keys)} keys, the index lists {n} rows for the shard and {found} keys in it")
    if wrong:
        out.append(f"{path}: {wrong} of the index's {found} keys of this shard are not at their row ({first})")
    return out


def sums_of_files(prefix: Path, rows: int, dim: int, dtype: str) -> dict:
    """The record of a shard written before checksums existed, from its bytes as they are now: only after its
    headers and sizes check out and every value is finite (a bad shard gets no checksum, so it stays refused)."""
    problems = [p for kind, shape, dt in (("image", (rows, dim), dtype), ("text", (rows, dim), dtype),
                                          ("keys", (rows,), KEY_DTYPE))
                for p in check_file(Path(f"{prefix}.{kind}.npy"), shape, np.dtype(dt), None, False)]
    if problems:
        raise ValueError("; ".join(problems))
    for kind in ("image", "text"):
        arr = np.load(f"{prefix}.{kind}.npy", mmap_mode="r")
        for i in range(0, rows, 65536):
            if not np.isfinite(arr[i : i + 65536]).all():
                raise ValueError(f"{prefix}.{kind}.npy: non-finite values")
    return {kind: file_sum(Path(f"{prefix}.{kind}.npy")) for kind in KINDS}


def add_checksums(db, prefix_of) -> None:
    """Migrate an index written before checksums: add shards.sums and fill it from each shard's bytes as they are
    now, if its headers, sizes and values check out (else it stays empty, and opening the shard is refused).
    prefix_of(teacher, version, unit) -> the shard's path prefix."""
    db.execute("BEGIN IMMEDIATE")  # one process migrates; another waits, then finds the column there
    try:
        if "sums" not in {c[1] for c in db.execute("PRAGMA table_info(shards)")}:
            db.execute("ALTER TABLE shards ADD COLUMN sums TEXT")
            shards = db.execute("SELECT s.id, s.teacher, s.version, s.unit, s.rows, t.dim, t.dtype FROM shards s "
                                "JOIN sets t USING (teacher, version)").fetchall()
            for sid, t, v, u, n, dim, dtype in shards:
                try:
                    sums = sums_of_files(prefix_of(t, v, u), n, dim, dtype)
                except ValueError as exc:
                    log.warning("feature shard %s@%s/%s gets no checksum: %s", t, v, u, exc)
                    continue
                db.execute("UPDATE shards SET sums=? WHERE id=?", (json.dumps(sums, sort_keys=True), sid))
        db.commit()
    except BaseException:
        db.rollback()
        raise


def set_digest(sums: list[dict | None]) -> str:
    """One hash of a feature set's shard records (in shard order): changes whenever any shard's bytes do."""
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]
