"""Owns whole-file writes: a file written through here is either absent, the old version, or the new one, whole.

The bytes go to a temp name beside the target (same folder, so the same filesystem), are flushed and fsynced,
then renamed over the target with os.replace (atomic on POSIX); the folder is fsynced so the rename itself
survives a power loss. A kill at any moment leaves at most a `.<name>.<pid>.tmp` file, which
`remove_stale_temps` deletes on the next run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """The temp name beside `path` that a writer of this process uses (hidden, pid-tagged, ends in .tmp)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened, e.g. some FUSE mounts)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` whole or not at all; returns path."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable)


def write_json(path: Path, obj, durable: bool = True, **dump_kw) -> Path:
    dump_kw.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **dump_kw), durable)


def remove_stale_temps(folder: Path, recursive: bool = False) -> list[Path]:
    """Delete temp files that atomic writers in `folder` left behind when killed; call with the workspace lock
    held, so that no live writer's temp file is taken."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"**/.*{TMP_SUFFIX}" if recursive else f".*{TMP_SUFFIX}"
    gone = [p for p in folder.glob(pattern) if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
