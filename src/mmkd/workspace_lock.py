"""Owns the workspace lock: one writer per workspace at a time, for a whole pipeline run or one step run alone.

The lock is `fcntl.flock` on `<root>/.mmkd/lock`. The kernel releases it when the holder's last descriptor closes,
so a holder killed by any signal (SIGKILL included) never leaves a stale lock. The holder writes its pid, host,
command and start time into the file, so that a second run, after waiting `workspace.lock_wait_s`, fails with
an error naming who holds the workspace.

Re-entrant within the process (a flow's steps run in its threads: a process-level holder count) and inherited by
the processes the holder starts: the holder exports MMKD_WORKSPACE_LOCK (the lock file's device, inode and the
holder's pid); a child that finds the lock taken by exactly that pid, alive and one of its ancestors, runs under it
(torchrun ranks, `dvc` or `mmkd` subprocesses). A child made by os.fork shares the holder's descriptor, hence the
lock itself; it never unlocks it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

LOCK_ENV = "MMKD_WORKSPACE_LOCK"
LOCK_FILE = Path(".mmkd") / "lock"
POLL_S = 0.05


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace lock; the message names it (pid, host, command, since when)."""


@dataclass
class _Held:
    fd: int
    count: int
    owner_pid: int         # the process that took the lock (a forked child sees its parent's entry)
    env_before: str | None


_HELD: dict[str, _Held] = {}
_GUARD = threading.RLock()


def _reset_after_fork() -> None:
    global _GUARD
    _GUARD = threading.RLock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def lock_path(root: str | Path) -> Path:
    return Path(root).resolve() / LOCK_FILE


def holder_info(root: str | Path) -> dict | None:
    """What the lock file says about its last holder (None when absent or unreadable)."""
    try:
        return json.loads(lock_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "an unknown process (its lock record is not written yet)"
    since = info.get("started", "?")
    age = time.time() - float(info.get("started_unix", time.time()))
    return (f"pid {info.get('pid')} on {info.get('host')} running `{info.get('command')}` "
            f"since {since} ({age:.0f} s)")


def _identity(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def _is_ancestor(pid: int) -> bool:
    """True when `pid` is alive and an ancestor of this process."""
    import psutil

    try:
        return any(p.pid == pid for p in psutil.Process().parents())
    except psutil.Error:
        return False


def _inherited(fd: int) -> bool:
    """The lock is taken; is it by the ancestor that MMKD_WORKSPACE_LOCK names, on this very lock file?"""
    value = os.environ.get(LOCK_ENV, "")
    try:
        identity, pid = value.rsplit(":", 1)
        pid = int(pid)
    except ValueError:
        return False
    if identity != _identity(fd):
        return False
    try:
        recorded = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == pid and _is_ancestor(pid)


def _record(fd: int, command: str) -> None:
    """Write who holds the lock, in place (the file must keep its inode: the lock is on it)."""
    now = time.time()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "started_unix": now}
    data = json.dumps(info).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


@contextmanager
def workspace_lock(root: str | Path, wait_s: float = 10.0, command: str | None = None) -> Iterator[str]:
    """Hold the workspace at `root` for the block; yields how: "acquired" (this call took it: the only moment
    when stale temp files of killed writers may be removed), "reentrant" (this process already held it) or
    "inherited" (a parent process holds it). Raises WorkspaceBusy after waiting `wait_s` seconds."""
    path = lock_path(root)
    key = str(path)
    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
            how = "reentrant" if held.owner_pid == os.getpid() else "inherited"
        else:
            how = _acquire(path, key, wait_s, command)
        counted = held is not None or how == "acquired"  # an env-inherited hold has no entry of its own
    try:
        yield how
    finally:
        if counted:
            _release(key)


def _acquire(path: Path, key: str, wait_s: float, command: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never unlinked or replaced: the lock is on its inode
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        while not _try_flock(fd):
            if _inherited(fd):
                os.close(fd)
                return "inherited"
            if time.monotonic() >= deadline:
                raise WorkspaceBusy(
                    f"workspace {path.parent.parent} is busy: {describe(holder_info(path.parent.parent))} holds "
                    f"{path}; waited {wait_s:g} s (workspace.lock_wait_s). One writer at a time: run this again "
                    "when it has finished")
            time.sleep(POLL_S)
        _record(fd, command)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = _Held(fd, 1, os.getpid(), os.environ.get(LOCK_ENV))
    os.environ[LOCK_ENV] = f"{_identity(fd)}:{os.getpid()}"  # children started from now on run under it
    return "acquired"


def _release(key: str) -> None:
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        if held.owner_pid != os.getpid():  # a forked child: the descriptor is shared, unlocking would free the parent's
            os.close(held.fd)
            return
        if held.env_before is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = held.env_before
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)


def holds(root: str | Path) -> bool:
    """Whether this process (or, after a fork, its parent) holds the workspace lock."""
    return str(lock_path(root)) in _HELD
