"""Prefect tasks of evaluate: one mapped task per (model, dataset), so a failing unit is retried, then reported."""

from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from mmkd.steps import Context, run_step
from mmkd.steps.evaluate import record_failure, run_unit


@task(name="evaluate_unit", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,  # embeddings are cached by content
      task_run_name="evaluate {model} on {dataset}")
def evaluate_unit(root: str, params_path: str, profile: str, model: str, dataset: str) -> dict:
    return run_unit(Context.load(root, params_path, profile), model, dataset)


@flow(name="evaluate-units")
def evaluate_flow(root: str, params_path: str, profile: str, parent_run_id: str | None, force: bool = False) -> dict:
    """The evaluate step, its units mapped as tasks; the step plans them and writes the reports."""
    ctx = Context.load(root, params_path, profile, parent_run_id)

    def map_eval_units(units: list[tuple[str, str]]) -> None:
        models, datasets = [u[0] for u in units], [u[1] for u in units]
        futures = evaluate_unit.map(unmapped(root), unmapped(params_path), unmapped(profile), models, datasets)
        for (model, dataset), future in zip(units, futures):
            future.wait()
            if not future.state.is_completed():  # retried already: record it, keep the other units' results
                try:
                    future.result()
                    error = f"task ended {future.state.type.value}"
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                record_failure(ctx, model, dataset, error)

    ctx.map_eval_units = map_eval_units
    return run_step("evaluate", ctx, reuse=not force)


def evaluate(root: str, params_path: str, profile: str, parent_run_id: str | None, force: bool = False) -> dict:
    """Called like every step task: evaluate.workers units at once (threads sharing the step's torch threads)."""
    workers = Context.load(root, params_path, profile).params.evaluate.workers
    return evaluate_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(
        root, params_path, profile, parent_run_id, force)


evaluate.name = "evaluate"
