"""The `retrain` flow: the full MMKD-CLIP pipeline, one task per step, one MLflow parent run per flow run.

The flow holds the workspace lock (mmkd.workspace_lock) from start to end: its steps re-enter it, and a second flow
or `mmkd stage` on the same workspace waits `workspace.lock_wait_s`, then fails naming this run.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from mmkd.steps import Context, StepRun, finish_pipeline, hold_workspace, start_pipeline
from mmkd.steps.synth import suite_missing
from tasks import retry_options
from tasks.align import align
from tasks.cache_features import cache_features
from tasks.curate import curate
from tasks.distill import distill
from tasks.evaluate import evaluate
from tasks.pretrain import pretrain
from tasks.register import register
from tasks.synth import synth
from tasks.teachers import teachers
from tasks.validate import validate

PIPELINE_TASKS = (curate, validate, teachers, cache_features, pretrain, align, distill, evaluate, register)


def with_retries(task, schedule):
    """A step task with params.yaml's retry policy; cache_features and evaluate retry inside, per work unit."""
    return task.with_options(**retry_options(schedule)) if hasattr(task, "with_options") else task


@flow(name="retrain", log_prints=True)
def retrain(profile: str | None = None, root: str = ".", params_path: str | None = None,
            synthesize_if_missing: bool = True, trigger: str = "manual", note: str = "", force: bool = False) -> dict:
    """Run every step in order; steps exchange files under `root`, and only paths and run ids cross tasks.

    `trigger` (schedule, inbox, manual, ...) and `note` (e.g. the inbox drops) are recorded on the parent run.
    A step whose inputs, params and code are unchanged since its last success is skipped (schedule.skip_unchanged;
    mmkd.steps.reuse), e.g. the teachers in an inbox retrain; `force` runs every step.
    """
    logger = get_run_logger()
    ctx = Context.load(root, params_path, profile)
    with hold_workspace(ctx, f"flow retrain (trigger {trigger})"):  # one writer per workspace, for the whole run
        args = (str(ctx.ws.root), str(ctx.params_path), ctx.params.profile)
        t0 = time.perf_counter()
        tags = {"mmkd.trigger": trigger, **({"mmkd.note": note} if note else {})}
        parent = start_pipeline(ctx, entry="prefect", tags=tags)
        logger.info("MLflow parent run %s (profile %s, trigger %s)", parent, ctx.params.profile, trigger)
        results: dict = {}
        try:
            if not ctx.ws.raw_manifest.exists() or suite_missing(ctx):
                if not synthesize_if_missing:
                    raise FileNotFoundError(f"{ctx.ws.raw_manifest} missing and synthesize_if_missing is off")
                results["synth"] = with_retries(synth, ctx.params.schedule)(*args, parent, force=True)
            for task in PIPELINE_TASKS:
                results[task.name] = with_retries(task, ctx.params.schedule)(*args, parent, force=force)
                if results[task.name].get("skipped"):
                    logger.info("%s skipped: unchanged since run %s (fingerprint %s)", task.name,
                                results[task.name]["reused_run_id"], results[task.name]["fingerprint"])
        except BaseException:
            finish_pipeline(ctx, parent, ok=False)
            raise
        seconds = time.perf_counter() - t0
        reg = results["register"]["summary"]
        skipped = [k for k, v in results.items() if v.get("skipped")]
        logger.info("%s %s v%s: %s (%s); champion: v%s", "kept" if "register" in skipped else "registered",
                    reg["model_name"], reg["version"], "promoted" if reg["promoted"] else "held", reg["reason"],
                    reg["champion_version"])
        StepRun(ctx.tracker().client, parent).set_tags({"mmkd.skipped_steps": ",".join(skipped) or "none"})
        finish_pipeline(ctx, parent, ok=True, summary={"pipeline_seconds": seconds,
                                                       **{f"{k}_seconds": v["seconds"] for k, v in results.items()}})
        # registration: model_uri (the new version), champion_uri, and the gate's promoted, reason, challenger_score,
        # champion_score (mmkd.tracking.gate)
        return {"parent_run_id": parent, "seconds": seconds, "registration": reg,
                "steps": {k: v["seconds"] for k, v in results.items()}, "skipped": skipped,
                "run_ids": {k: v["run_id"] for k, v in results.items()},
                "summaries": {k: v.get("summary") for k, v in results.items()}}
