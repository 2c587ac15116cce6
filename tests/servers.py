"""Real servers for tests, started on 127.0.0.1 free ports and stopped after: the team MLflow stack, a local one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


class ModelServer:
    """`mlflow models serve` on a registered model, on 127.0.0.1; `url()` waits until it answers /ping;
    `server_pid()` is the uvicorn process that serves (the CLI's child) once it answers."""

    def __init__(self, tracking_uri: str, log: Path, model: str = "models:/mmkd-student@champion"):
        self.log, self.port = log, free_port()
        bin_dir = Path(sys.executable).parent  # `mlflow` and the `uvicorn` it execs: this environment's scripts
        # TMPDIR: MLflow downloads the model into a temp folder it never removes; the test's folder, not /tmp
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TMPDIR": str(log.parent),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(self.port)]
        with open(log, "w") as out:  # its own session: the uvicorn child is stopped with it
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def url(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        wait_http(url + "/ping", self.proc, self.log, timeout=180)
        return url

    def server_pid(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, f"expected one uvicorn child of `mlflow models serve`, got {children}"
        return int(children[0])

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
