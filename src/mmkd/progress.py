"""Owns progress bars: live in a terminal; off a terminal (log files, CI, Prefect workers) a log line every 30 s.

A tqdm bar writing to a file that is not a terminal still writes one carriage-return update per refresh (and
`set_postfix` refreshes on every training step), so a log file gets thousands of them on one line. Off a
terminal the bar is rendered as a normal log line on the `mmkd.progress` logger instead: one every
`MMKD_PROGRESS_INTERVAL` seconds (default 30) and a last one when the bar closes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("mmkd.progress")


class _Discard:
    """tqdm's own writes (the bar, '\\r', '\\n') go nowhere; the lines go to the log."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LogProgress(tqdm):
    """A tqdm bar that logs its state every `interval` seconds and once when it closes, never a carriage return."""

    def __init__(self, *args, interval: float | None = None, **kwargs):
        self._interval = float(os.environ.get("MMKD_PROGRESS_INTERVAL", 30.0)) if interval is None else interval
        self._last_log: float | None = None
        self._closing = False
        kwargs["file"] = _Discard()
        kwargs.setdefault("mininterval", min(self._interval, 1.0))
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing the line
            return True
        now = time.monotonic()
        if self._last_log is None and not self._closing:  # the start: only remember when it was
            self._last_log = now
            return True
        if not self._closing and now - self._last_log < self._interval:
            return True
        self._last_log = now
        log.info("%s", msg if msg is not None else self.format_meter(**self.format_dict))
        return True

    def close(self) -> None:
        if self.disable:
            return
        self._closing = True
        super().close()


def progress(*args, **kwargs) -> tqdm:
    """A progress bar: tqdm on a terminal, LogProgress elsewhere. `disable=None` keeps tqdm's meaning (off a
    terminal, no bar at all), for short inner bars whose lines would only add noise."""
    if sys.stderr.isatty():
        return tqdm(*args, **kwargs)
    if kwargs.get("disable", False) is None:
        kwargs["disable"] = True
    return LogProgress(*args, **kwargs)
