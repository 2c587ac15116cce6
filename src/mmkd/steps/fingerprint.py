"""Owns content fingerprints of files and folders: blake2b of every file, remembered by (inode, size, mtime) in
`.mmkd/hashes.sqlite` so that an unchanged file is not read again (as DVC's state database does)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

CHUNK = 1 << 20


def _ignored(name: str) -> bool:
    """Temp files of atomic writes (`.<name>.<pid>.tmp`), hidden working files and bytecode are not content."""
    return name.startswith(".") or name == "__pycache__" or name.endswith(".pyc")


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """File digests keyed by absolute path, valid while (inode, size, mtime_ns) are those they were computed for.

    A file rewritten in place with the same size within one mtime tick would be missed, as by DVC and make; every
    writer here replaces files by rename, which gives a new inode."""

    def __init__(self, db: Path | None):
        self.db = None
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(db, timeout=30)
            self.db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, "
                            "mtime_ns INTEGER, digest TEXT)")

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = str(path)
        if self.db is not None:
            row = self.db.execute("SELECT ino, size, mtime_ns, digest FROM hashes WHERE path = ?", (key,)).fetchone()
            if row and tuple(row[:3]) == (st.st_ino, st.st_size, st.st_mtime_ns):
                return row[3]
        digest = file_digest(path)
        if self.db is not None:
            self.db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)",
                            (key, st.st_ino, st.st_size, st.st_mtime_ns, digest))
        return digest

    def close(self) -> None:
        if self.db is not None:
            self.db.commit()
            self.db.close()
            self.db = None

    def __enter__(self) -> "HashCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tree_digest(path: Path, cache: HashCache) -> str:
    """The content of a file or a folder (relative names and file digests, sorted; links followed): 'absent' when
    it does not exist. Independent of where the folder lives, so a copied workspace has the same digests."""
    path = Path(path)
    if not path.exists():
        return "absent"
    if path.is_file():
        return "file:" + cache.digest(path)
    h = hashlib.blake2b(digest_size=16)
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for name in sorted(f for f in filenames if not _ignored(f)):
            file = Path(dirpath) / name
            if not file.is_file():  # a socket, a fifo, a dangling link: not content
                continue
            h.update(f"{file.relative_to(path).as_posix()}\0{cache.digest(file)}\n".encode())
    return "dir:" + h.hexdigest()


def code_digest() -> str:
    """The library's own code (every file of the installed mmkd package, flows/ and tasks/) and the versions of the
    libraries that compute with it: any change re-runs every step, conservatively."""
    import importlib.metadata as md
    import importlib.util
    import sys

    global _CODE
    if _CODE is None:
        h = hashlib.blake2b(digest_size=16)
        for package in ("mmkd", "flows", "tasks"):  # found without importing them (flows would import Prefect)
            spec = importlib.util.find_spec(package)
            for folder in (spec.submodule_search_locations or []) if spec else []:
                h.update(f"{package}:{tree_digest(Path(folder), HashCache(None))}\n".encode())
        versions = [f"python {sys.version_info.major}.{sys.version_info.minor}"]
        for dist in ("torch", "open_clip_torch", "numpy", "scikit-learn", "scikit-survival", "pillow"):
            try:
                versions.append(f"{dist} {md.version(dist)}")
            except md.PackageNotFoundError:
                versions.append(f"{dist} absent")
        h.update("\n".join(versions).encode())
        _CODE = h.hexdigest()
    return _CODE


_CODE: str | None = None
