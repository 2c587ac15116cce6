"""Owns whole-file writes: a file written through here is either absent, the old version, or the new one, whole.

The bytes go to a temp name beside the target (same folder, so the same filesystem), are flushed and fsynced,
then renamed over the target with os.replace (atomic on POSIX); the folder is fsynced so the rename itself
survives a power loss. A kill at any moment leaves at most a `.<name>.<pid>.tmp` file, which
`remove_stale_temps` deletes when the next run takes the workspace lock.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

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


@contextmanager
def replacing(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file handle whose bytes replace `path` whole when the block ends without an error (streamed: large
    files need not be in memory); on an error, or a kill, `path` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` whole or not at all; returns path."""
    with replacing(path, durable) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: Path, text: str, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable)


def write_json(path: Path, obj, durable: bool = True, **dump_kw) -> Path:
    dump_kw.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **dump_kw), durable)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(folder: Path, recursive: bool = False, name: str = "*", dead_writers_only: bool = False
                       ) -> list[Path]:
    """Delete the temp files that killed atomic writers left in `folder` (of target `name`, a glob). Call it with
    the workspace lock held, so that no live writer's temp file is taken; without the lock, `dead_writers_only`
    keeps the temp files of processes still running on this host (their pid is in the name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*{TMP_SUFFIX}"
    gone = []
    for p in folder.glob(f"**/{pattern}" if recursive else pattern):
        pid = p.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
        if not p.is_file() or (dead_writers_only and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            continue
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone
