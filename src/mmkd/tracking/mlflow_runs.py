"""Owns MLflow tracking: absolute URIs, the parent run per pipeline run and a nested run per step, by run id."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

PARENT_ENV = "MMKD_PARENT_RUN_ID"
log = logging.getLogger("mmkd")


def tracking_uri(root: Path, configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else params' tracking_uri, else SQLite under mlflow_server/ (always absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str((Path(root) / uri[len("sqlite:///"):]).resolve())
        return uri
    db = (Path(root) / "mlflow_server" / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(root: Path) -> str:
    return (Path(root) / "mlflow_server" / "artifacts").resolve().as_uri()


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(root: Path, manifest: Path) -> str:
    """The data version: the DVC hash of data/ when data.dvc exists, else a sha256 of the raw manifests."""
    dvc_file = Path(root) / "data.dvc"
    if dvc_file.exists():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        if outs[0].get("md5"):
            return str(outs[0]["md5"])
    # without DVC: the manifests' own bytes (the corpus's and each manifest source's right under data/, the inbox's)
    files = [f for f in (manifest, *sorted(Path(manifest).parent.glob("*/manifest.jsonl"))) if f.exists()]
    if not files:
        return "none"
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StepRun:
    """Logging handle for one MLflow run, addressed by id (safe across threads and processes)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, tuple)) else str(v))
                 for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), ts, step) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


class SystemMetrics:
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU when nvidia-ml-py finds one) on a run id.

    MLflow samples every `interval` seconds but logs only whole intervals, and stops without logging once the
    run ends; `stop` takes one last sample and logs the partial interval too, so a step shorter than the
    interval still gets one point. Monitoring never fails a step: errors are logged and ignored.
    """

    def __init__(self, run_id: str, tracking_uri: str, interval: float = 10.0):
        self.monitor = None
        quiet = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
        if quiet.level == logging.NOTSET:  # its start/stop lines, four per step, unless configured otherwise
            quiet.setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracking_uri)
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 - e.g. psutil missing
            log.warning("system metrics off for run %s: %s", run_id, e)
            self.monitor = None

    def stop(self) -> None:
        m, self.monitor = self.monitor, None
        if m is None:
            return
        try:
            m.finish()  # stops and joins the sampling thread, logs what it had queued
            m.collect_metrics()
            last = m.aggregate_metrics()
            if last:
                m.publish_metrics(last)
                m.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001
            log.warning("system metrics: last sample not logged: %s", e)


class Tracker:
    """One experiment; creates parent and nested step runs by id.

    `system_metrics`: seconds between system-metrics samples on each step run (`run`), or None for none.
    """

    def __init__(self, root: Path, experiment: str, configured_uri: str | None = None,
                 system_metrics: float | None = None):
        self.uri = tracking_uri(root, configured_uri)
        self.system_metrics = system_metrics
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            is_local = self.uri.startswith("sqlite:")
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location(root) if is_local else None)
        else:
            self.experiment_id = exp.experiment_id

    def start(self, name: str, tags: dict, parent_run_id: str | None = None) -> StepRun:
        all_tags = {k: str(v) for k, v in tags.items()}  # a REST store (tracking server) takes string tags only
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return StepRun(self.client, run.info.run_id)

    def finish(self, run: StepRun, ok: bool) -> None:
        self.client.set_terminated(run.run_id, status="FINISHED" if ok else "FAILED")

    @contextmanager
    def run(self, name: str, tags: dict, parent_run_id: str | None = None) -> Iterator[StepRun]:
        step = self.start(name, tags, parent_run_id)
        monitor = SystemMetrics(step.run_id, self.uri, self.system_metrics) if self.system_metrics else None
        try:
            yield step
        except BaseException:
            if monitor:
                monitor.stop()
            self.finish(step, ok=False)
            raise
        if monitor:
            monitor.stop()
        self.finish(step, ok=True)
