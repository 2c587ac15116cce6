"""Progress off a terminal is periodic log lines; retries are for transient failures only."""

from __future__ import annotations

import errno
import logging
import sqlite3

from mmkd.progress import LogProgress, progress
from mmkd.transient import is_transient


def test_off_a_terminal_a_bar_is_log_lines_never_carriage_returns(caplog, capsys):
    caplog.set_level(logging.INFO, logger="mmkd.progress")
    with LogProgress(total=50, desc="teacher x", unit="step", interval=0.0) as bar:
        for i in range(50):
            bar.set_postfix(loss=1.0 / (i + 1))  # refreshes on every step, as the training loop does
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmkd.progress"]
    assert lines and all("\r" not in line for line in lines)
    assert lines[-1].startswith("teacher x: 100%") and "50/50" in lines[-1]
    out = capsys.readouterr()
    assert "\r" not in out.err and "\r" not in out.out


def test_the_interval_limits_the_lines_and_the_end_is_always_logged(caplog):
    caplog.set_level(logging.INFO, logger="mmkd.progress")
    with LogProgress(total=1000, desc="curate", interval=3600.0) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "mmkd.progress"]
    assert len(lines) == 1 and "1000/1000" in lines[0]


def test_disable_none_means_no_bar_off_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="mmkd.progress")
    with progress(total=3, desc="inner", disable=None, leave=False) as bar:  # pytest's stderr is not a tty
        bar.update(3)
    assert not [r for r in caplog.records if r.name == "mmkd.progress"]


def test_transient_failures_are_network_overload_and_locks():
    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    try:  # an error raised while handling a transient one counts as transient
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError as e:
            raise RuntimeError("logging the metrics failed") from e
    except RuntimeError as wrapped:
        assert is_transient(wrapped)

    class Unavailable(Exception):
        error_code = "TEMPORARILY_UNAVAILABLE"

    class Http(Exception):
        status_code = 503

    assert is_transient(Unavailable()) and is_transient(Http())


def test_other_failures_are_not_retried():
    for exc in (ValueError("bad param"), FileNotFoundError(errno.ENOENT, "no such file"), KeyError("x"),
                MemoryError(), sqlite3.OperationalError("no such table: runs"), RuntimeError("loss became nan")):
        assert not is_transient(exc), exc


def test_prefect_retries_a_transient_failure_and_not_a_bad_one(prefect_harness):
    """The step tasks' policy on real Prefect task runs: a dropped connection is retried, a bad value is not."""
    from types import SimpleNamespace

    from prefect import flow, task

    from tasks import retry_options

    calls = {"transient": 0, "bad": 0}
    policy = retry_options(SimpleNamespace(retries=2, retry_backoff_seconds=0.0, retry_jitter=0.0))

    @task(**policy)
    def flaky(kind: str) -> str:
        calls[kind] += 1
        if kind == "transient" and calls[kind] < 3:
            raise ConnectionResetError("the tracking server went away")
        if kind == "bad":
            raise ValueError("distill.fd_weight must be >= 0")
        return "done"

    @flow
    def run(kind: str) -> str:
        return flaky(kind)

    assert run("transient") == "done" and calls["transient"] == 3  # two retries, then success
    try:
        run("bad")
    except ValueError:
        pass
    assert calls["bad"] == 1  # failed at once
