"""Owns the pipeline steps: each binds params.yaml and the workspace to one library function and logs to MLflow.

One module per step; the CLI (`mmkd stage NAME`), the DVC stages and the Prefect tasks all call `run_step`;
nothing else runs a step. `run_step` holds the workspace lock (one writer per workspace): a flow holds it for the
whole run, so its steps re-enter it; torchrun's secondary ranks run under rank 0's hold and write nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from mmkd.steps.align import step_align
from mmkd.steps.cache_features import step_cache_features
from mmkd.steps import reuse as reuse_mod
from mmkd.steps.common import (
    PIPELINE,
    Context,
    NullRun,
    StepRun,
    hold_workspace,
    is_secondary_rank,
    seed_everything,
)
from mmkd.steps.curate import step_curate
from mmkd.steps.distill import step_distill
from mmkd.steps.evaluate import step_evaluate
from mmkd.steps.pretrain import step_pretrain
from mmkd.steps.register import step_register
from mmkd.steps.synth import step_synth
from mmkd.steps.teachers import load_teachers, step_teachers
from mmkd.steps.validate import step_validate
from mmkd.tracking.mlflow_runs import data_hash

__all__ = ["PIPELINE", "STEPS", "Context", "run_step", "start_pipeline", "finish_pipeline", "load_teachers",
           "hold_workspace"]
log = logging.getLogger("mmkd")

STEPS: dict[str, Callable[[Context, StepRun], dict]] = {
    "synth": step_synth, "curate": step_curate, "validate": step_validate, "teachers": step_teachers,
    "cache_features": step_cache_features, "align": step_align, "pretrain": step_pretrain, "distill": step_distill,
    "evaluate": step_evaluate, "register": step_register,
}


def run_step(name: str, ctx: Context, reuse: bool = False) -> dict:
    """Run one step inside its own MLflow run (nested under ctx.parent_run_id when given).

    reuse (flows; with schedule.skip_unchanged): skip the step when its fingerprint and outputs are those of its last
    successful run (mmkd.steps.reuse); the skip is an MLflow run of its own, tagged mmkd.skipped with the fingerprint.
    """
    if name not in STEPS:
        raise KeyError(f"unknown step '{name}'; steps: {list(STEPS)}")
    seed_everything(ctx.params.seed, ctx.params.threads)
    if is_secondary_rank():  # under torchrun: train as one rank, leave tracking and outputs to rank 0
        t0 = time.perf_counter()
        summary = STEPS[name](ctx, NullRun())
        return {"step": name, "seconds": round(time.perf_counter() - t0, 2), "run_id": None, "summary": summary}
    # every step writes under data/, artifacts/ or reports/: one writer per workspace (re-entrant under a flow)
    with hold_workspace(ctx, f"mmkd stage {name}"):
        t0 = time.perf_counter()
        if reuse and ctx.params.schedule.skip_unchanged and name in reuse_mod.STEP_IO:
            fp, record, why = reuse_mod.reusable(ctx, name)
            if record is not None:
                return _skipped(ctx, name, fp, record, time.perf_counter() - t0)
            log.info("step %s runs: %s (fingerprint %s)", name, why, fp["id"])
        else:
            fp = reuse_mod.fingerprint_now(ctx, name)  # of the inputs as the step reads them
        reuse_mod.forget(ctx, name)
        tracker = ctx.tracker()
        with tracker.run(name, ctx.tags(name), ctx.parent_run_id) as run:
            run.set_tags({"mmkd.skipped": "false", **({"mmkd.fingerprint": fp["id"]} if fp else {})})
            summary = STEPS[name](ctx, run)
            seconds = time.perf_counter() - t0
            run.log_metrics({"step_seconds": seconds})
        try:
            if fp:
                reuse_mod.remember(ctx, name, fp, summary, run.run_id)
        except OSError as exc:  # the step succeeded; without its record the next flow runs it again
            log.warning("step %s: could not record its fingerprint (%s); a flow will run it again", name, exc)
    log.info("step %s done in %.1fs", name, seconds)
    return {"step": name, "seconds": round(seconds, 2), "run_id": run.run_id, "summary": summary, "skipped": False}


def _skipped(ctx: Context, name: str, fp: dict, record: dict, seconds: float) -> dict:
    """The record of a step not run again: an MLflow run saying so, with the fingerprint and the run it reuses."""
    tracker = ctx.tracker()
    with tracker.run(name, ctx.tags(name), ctx.parent_run_id) as run:
        run.set_tags({"mmkd.skipped": "true", "mmkd.fingerprint": fp["id"],
                      "mmkd.reused_run_id": record.get("run_id") or "", "mmkd.reused_from": record.get("finished", ""),
                      "mlflow.note.content": f"skipped: inputs, params and code unchanged since run "
                                             f"{record.get('run_id')} ({record.get('finished')}); fingerprint {fp['id']}"})
        run.log_metrics({"step_seconds": seconds})
    log.info("step %s skipped: unchanged since run %s (fingerprint %s)", name, record.get("run_id"), fp["id"])
    return {"step": name, "seconds": round(seconds, 2), "run_id": run.run_id, "summary": record.get("summary"),
            "skipped": True, "fingerprint": fp["id"], "reused_run_id": record.get("run_id")}


def start_pipeline(ctx: Context, entry: str, tags: dict | None = None, name: str = "retrain") -> str:
    """The parent run of one pipeline run; `tags` say why it ran (mmkd.trigger: schedule, inbox, manual, ...)."""
    tracker = ctx.tracker()
    run = tracker.start(f"{name}-{ctx.params.profile}", {**ctx.tags("pipeline"), "mmkd.entry": entry, **(tags or {})})
    run.log_params({"profile": ctx.params.profile, "seed": ctx.params.seed, "params_file": str(ctx.params_path)})
    return run.run_id


def finish_pipeline(ctx: Context, run_id: str, ok: bool, summary: dict | None = None) -> None:
    tracker = ctx.tracker()
    run = StepRun(tracker.client, run_id)
    # data may have been generated inside the pipeline, after the parent run was tagged
    run.set_tags({"mmkd.data_hash": data_hash(ctx.ws.root, ctx.ws.raw_manifest)})
    if summary:
        run.log_metrics(summary)
    if ok and ctx.ws.leaderboard.exists():
        run.log_artifact(ctx.ws.leaderboard)
        run.log_artifact(ctx.ws.metrics)
    tracker.finish(run, ok)
