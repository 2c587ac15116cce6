"""Prefect tasks of the inbox flow: plan a drop (cached by its files), ingest it, version data/ with DVC."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mmkd.data.inbox import DropPlan, drop_state, ingest_drop, plan_drop
from mmkd.tracking.mlflow_runs import data_hash
from tasks import retry_if_transient


def _drop_key(context, parameters) -> str:
    """Planning only reads the drop: its result is reused while no file in the drop changed (name, size, mtime)."""
    state = json.dumps([parameters["drop"], drop_state(Path(parameters["drop"]))])
    return "inbox-plan-" + hashlib.sha256(state.encode()).hexdigest()


@task(name="plan_drop", cache_key_fn=_drop_key, cache_expiration=timedelta(days=7), persist_result=True,
      task_run_name="plan {drop}")
def plan(drop: str) -> dict:
    """Hash a drop's files (the only Prefect-cached task: read-only, keyed by the files it reads)."""
    return plan_drop(Path(drop)).as_dict()


@task(name="ingest_drop", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient, task_run_name="ingest {drop_plan[name]}")
def ingest(drop_plan: dict, source_manifest: str, processed_dir: str, image_column: str) -> dict:
    """Copy the drop into data/, append its rows to the inbox source, archive it (idempotent by drop id)."""
    return ingest_drop(DropPlan(**drop_plan), Path(source_manifest), Path(processed_dir), image_column)


@task(name="version_data", cache_policy=NO_CACHE)
def version_data(root: str, data_dir: str) -> dict:
    """`dvc add` data/ where the workspace is a DVC project, so data.dvc names the new data version."""
    root_path = Path(root)
    if not (root_path / ".dvc").is_dir():
        return {"dvc": False, "data_version": data_hash(root_path, Path(data_dir) / "manifest.jsonl")}
    out = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(Path(data_dir).relative_to(root_path))],
                         cwd=root_path, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dvc add {data_dir} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return {"dvc": True, "data_version": data_hash(root_path, Path(data_dir) / "manifest.jsonl")}
