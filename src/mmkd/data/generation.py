"""Owns replacing a directory as a whole: each run builds a new generation beside the live one and swaps it in.

Three sibling names on one filesystem: `<live>` (what readers open), `.<live>.next` (the generation being built,
invisible to readers) and `.<live>.old` (only while the fallback switch runs). The switch is one
renameat2(RENAME_EXCHANGE) where the kernel and filesystem have it (Linux >= 3.15: ext4, xfs, btrfs, tmpfs...):
live and next trade places in one step, and the old generation, now under the next name, is deleted. Elsewhere
it is two renames, live -> old then next -> live, and `recover` finishes or undoes a switch killed between them.
What a kill leaves, at any point:
  - while next is being built: live is the old generation, whole; next is a partial leftover;
  - during the exchange: live is the old or the new generation, whole (one atomic step);
  - while the old generation is deleted: live is the new generation; next holds a partial old one;
  - fallback, between the two renames: no live; old is the previous generation, whole, and next the new one,
    whole (next is only switched in complete): readers open old (`resolve`), `recover` renames next -> live.
`recover`, at the start of the next run (workspace lock held), leaves exactly one whole live generation.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from mmkd.atomic import fsync_dir

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
try:
    _RENAMEAT2 = ctypes.CDLL(None, use_errno=True).renameat2
    _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):  # not glibc >= 2.28, or not Linux
    _RENAMEAT2 = None


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing directory entries in one atomic step; False where the system cannot (then nothing moved)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # flag or call not supported here
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def siblings(live: Path) -> tuple[Path, Path]:
    """(next, old): the names of the generation being built and of the one a fallback switch is replacing."""
    live = Path(live)
    return live.with_name(f".{live.name}.next"), live.with_name(f".{live.name}.old")


def resolve(live: Path) -> Path:
    """The directory a reader opens: live, or the previous generation while a killed fallback switch awaits
    recovery (both whole). Cheap: one or two stat calls; it never moves anything (readers hold no lock)."""
    live = Path(live)
    if live.exists():
        return live
    old = siblings(live)[1]
    return old if old.is_dir() else live


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a second name of src's file (no bytes copied; files of the store are never written in place,
    so generations may share them); a copy where the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


class Generations:
    """The live directory and its sibling generations (see the module docstring)."""

    def __init__(self, live: Path, durable: bool = True):
        self.live, self.durable = Path(live), durable
        self.next, self.old = siblings(self.live)

    def recover(self) -> list[str]:
        """Bring what a killed run left back to one whole live generation; returns what it did."""
        done = []
        if not self.live.exists() and self.old.is_dir():  # the fallback switch was killed between its renames
            if self.next.is_dir():  # next is whole: it is only switched in once complete
                os.rename(self.next, self.live)
                done.append(f"switched in {self.live.name} (completed the interrupted switch)")
            else:
                os.rename(self.old, self.live)
                done.append(f"restored {self.live.name} (undid the interrupted switch)")
            fsync_dir(self.live.parent)
        for leftover in (self.next, self.old):
            if leftover.exists():
                shutil.rmtree(leftover)
                done.append(f"removed {leftover.name}")
        return done

    def begin(self) -> Path:
        """A fresh, empty next generation."""
        if self.next.exists():
            shutil.rmtree(self.next)
        self.next.mkdir(parents=True)
        return self.next

    def commit(self) -> None:
        """Switch the complete next generation in (its files already flushed), then delete the old one."""
        for folder, _, _ in os.walk(self.next):  # the names in it (links, renames) must be on disk before the switch
            self._sync(Path(folder))
        if not self.live.exists():  # a first run
            os.rename(self.next, self.live)
            self._sync(self.live.parent)
            return
        if exchange(self.next, self.live):
            self._sync(self.live.parent)
            shutil.rmtree(self.next)  # now the old generation
            return
        os.rename(self.live, self.old)
        os.rename(self.next, self.live)
        self._sync(self.live.parent)
        shutil.rmtree(self.old)

    def _sync(self, folder: Path) -> None:
        if self.durable:
            fsync_dir(folder)
