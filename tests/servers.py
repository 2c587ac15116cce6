"""Real servers for tests, started on 127.0.0.1 free ports and stopped after: the team MLflow stack, a local one."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The library's own starters, so that the tests exercise the code users run (`mmkd mlflow-server`).
from mmkd.tracking.servers import (  # noqa: F401 - free_port, wait_http and stop are used by other tests
    database, free_port, local_server, start_mlflow, stop, team_stack, wait_http,
)


@contextmanager
def team_server(root: Path) -> Iterator[dict]:
    """The team stack (PostgreSQL + SeaweedFS S3 + MLflow) under root: {"uri", "env", "log", "postgres_uri", "s3"}."""
    # one uvicorn worker starts fastest (its threads serve concurrent requests); the data is thrown away, so
    # SeaweedFS needs no graceful stop
    with team_stack(root, workers=1, stop_timeout=3) as s:
        yield s.as_dict()


@contextmanager
def mlflow_server(root: Path) -> Iterator[dict]:
    """`mlflow server` on a SQLite store and local artifacts under root (the local default)."""
    with local_server(root, workers=1) as s:
        yield s.as_dict()
