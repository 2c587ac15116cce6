"""Kill points shared by the fault tests: a rename and a SQLite connection that report each operation to `event`
(which SIGKILLs the process at a counted point) around the real call."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def dying_replace(seen: list[int], event, real_replace):
    """os.replace that reports each rename: every other one (by the count in `seen`) dies just after it happened
    instead of just before."""

    def replace(src, dst):
        if seen[0] % 2:
            real_replace(src, dst)
            event()
            return None
        event()
        return real_replace(src, dst)

    return replace


class CountedConnection:
    """A connection whose `with` blocks report (and so may die) after their statements ran, before the commit."""

    def __init__(self, db, event):
        self._db, self._event = db, event

    def __getattr__(self, name):
        return getattr(self._db, name)

    def __enter__(self):
        return self._db.__enter__()

    def __exit__(self, *exc):
        if exc[0] is None:
            self._event()
        return self._db.__exit__(*exc)


@contextmanager
def memory_folder(fallback: Path, prefix: str):
    """A folder in memory (/dev/shm) where there is one, else `fallback`: a SIGKILL loses no page-cache data, so
    the disk's fsyncs (most of a tiny run's time) protect nothing in these tests."""
    if not os.path.isdir("/dev/shm"):
        yield fallback
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
