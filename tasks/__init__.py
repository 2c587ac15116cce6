"""Prefect tasks: one thin wrapper per pipeline step around mmkd.steps.run_step, and the retry policy they share.

No step task is cached by Prefect: every step logs to MLflow and writes DVC-tracked files, so a cached result
would skip those side effects. The safe caching is by content, below Prefect: curation is incremental, the
feature store and the evaluation's embedding cache reuse what their keys say is unchanged, and DVC skips
stages whose inputs did not change. The only Prefect-cached task is the inbox's read-only planning
(tasks/inbox.py), keyed by the drop's files.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from mmkd.config import ScheduleCfg
from mmkd.steps import Context, run_step
from mmkd.transient import is_transient


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a network, overload or lock failure; fail anything else at once."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the failure itself, classified
        return is_transient(exc)
    return False


def retry_options(schedule) -> dict:
    """Task options from params.yaml's schedule section: retries, exponential backoff with jitter, transient only."""
    return {"retries": schedule.retries,
            "retry_delay_seconds": exponential_backoff(backoff_factor=schedule.retry_backoff_seconds)
            if schedule.retry_backoff_seconds else 0,
            "retry_jitter_factor": schedule.retry_jitter, "retry_condition_fn": retry_if_transient}


def step_task(name: str):
    """A Prefect task running step `name`; it takes paths and a run id, never in-memory objects. Its retry policy is
    the schedule section's defaults; the retrain flow applies the workspace's own with `with_options`."""

    @task(name=name, cache_policy=NO_CACHE, **retry_options(ScheduleCfg()))
    def _run(root: str, params_path: str, profile: str, parent_run_id: str, force: bool = False) -> dict:
        # a flow's step: skipped when unchanged since its last success (schedule.skip_unchanged), unless forced
        return run_step(name, Context.load(root, params_path, profile, parent_run_id), reuse=not force)

    return _run
