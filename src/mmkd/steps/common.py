"""Owns what every step shares: the Context (params + workspace + parent run), the workspace lock, seeding, device,
metric logging."""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mmkd.atomic import remove_stale_temps
from mmkd.config import Params, Workspace, load_params
from mmkd.tracking.mlflow_runs import PARENT_ENV, StepRun, Tracker, data_hash, git_commit

log = logging.getLogger("mmkd")
# align follows pretrain: the shared teacher space is anchored on the stage-1 student (docs/distillation.md)
PIPELINE = ("curate", "validate", "teachers", "cache_features", "pretrain", "align", "distill", "evaluate", "register")


@dataclass
class Context:
    ws: Workspace
    params_path: Path
    parent_run_id: str | None = None
    # set by the Prefect flow: runs cache_features' work units as mapped tasks (threads or a Dask cluster)
    map_units: Callable[[list[str]], list[dict]] | None = None
    # set by the Prefect flow: runs evaluate's (model, dataset) units as mapped tasks, recording failures
    map_eval_units: Callable[[list[tuple[str, str]]], None] | None = None

    @property
    def params(self) -> Params:
        return self.ws.params

    @classmethod
    def load(cls, root: str | Path = ".", params_path: str | Path | None = None, profile: str | None = None,
             parent_run_id: str | None = None) -> "Context":
        root = Path(root).resolve()
        params_path = Path(params_path) if params_path else root / "params.yaml"
        params = load_params(params_path, profile)
        return cls(Workspace(root, params), params_path.resolve(), parent_run_id or os.environ.get(PARENT_ENV))

    def tracker(self) -> Tracker:
        t = self.params.tracking
        return Tracker(self.ws.root, t.experiment, t.tracking_uri,
                       system_metrics=t.system_metrics_interval if t.system_metrics else None)

    def tags(self, step: str) -> dict:
        return {"mmkd.step": step, "mmkd.profile": self.params.profile, "mmkd.seed": self.params.seed,
                "mlflow.source.git.commit": git_commit(self.ws.root),
                "mmkd.data_hash": data_hash(self.ws.root, self.ws.raw_manifest)}


@contextmanager
def hold_workspace(ctx: Context, command: str) -> Iterator[str]:
    """Hold the workspace lock (mmkd.workspace_lock) for the block: a flow run, or a step run alone. Whoever takes it
    first removes the temp files writers killed earlier left in artifacts/ and reports/: no live writer can own
    them then. Yields how the lock is held: acquired, reentrant or inherited."""
    from mmkd.workspace_lock import workspace_lock

    with workspace_lock(ctx.ws.root, ctx.params.workspace.lock_wait_s, command) as how:
        if how == "acquired":
            stale = [p for d in (ctx.ws.artifacts, ctx.ws.reports) for p in remove_stale_temps(d, recursive=True)]
            if stale:
                log.info("removed %d temp file(s) left by killed writers, e.g. %s", len(stale), stale[0])
        yield how


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def _device(ctx: Context) -> torch.device:
    from mmkd.models.factory import resolve_device

    return resolve_device(ctx.params.device)


def _metric_logger(run: StepRun, prefix: str) -> Callable[[dict, int], None]:
    return lambda metrics, step: run.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step)


class NullRun:
    """The MLflow run of a torchrun rank other than 0: the step runs, rank 0 alone records it."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def is_secondary_rank() -> bool:
    """True in torchrun's ranks 1..N-1 (RANK is set by torchrun before any process group exists)."""
    return int(os.environ.get("RANK", "0")) > 0
