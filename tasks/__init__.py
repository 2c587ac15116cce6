"""Prefect tasks: one thin wrapper per pipeline step around mmkd.steps.run_step."""

from __future__ import annotations

from prefect import task

from mmkd.steps import Context, run_step


def step_task(name: str, retries: int = 0):
    """A Prefect task running step `name`; it takes paths and a run id, never in-memory objects."""

    @task(name=name, retries=retries, retry_delay_seconds=10)
    def _run(root: str, params_path: str, profile: str, parent_run_id: str) -> dict:
        return run_step(name, Context.load(root, params_path, profile, parent_run_id))

    return _run
