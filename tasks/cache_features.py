"""Prefect tasks of cache_features: one task per work unit, mapped by a subflow on the configured task runner."""

from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from mmkd.steps import Context, run_step
from mmkd.steps.cache_features import cache_unit as run_cache_unit


@task(name="cache_unit", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)  # the store is the cache
def cache_unit(root: str, params_path: str, profile: str, plan_path: str) -> dict:
    """One work unit: its shards are written atomically, so a retry or a re-run never sees half of one."""
    return run_cache_unit(root, params_path, profile, plan_path)


def task_runner(features):
    """features.executor: local (one thread; the forward passes use the step's torch threads) or dask."""
    if features.executor == "dask":
        from prefect_dask import DaskTaskRunner

        if features.dask.address:
            return DaskTaskRunner(address=features.dask.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": features.dask.n_workers, "processes": True,
                                              "threads_per_worker": features.dask.threads_per_worker,
                                              "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=1)


@flow(name="cache_features")
def cache_features_flow(root: str, params_path: str, profile: str, parent_run_id: str | None,
                        force: bool = False) -> dict:
    """The cache_features step with its units mapped as tasks; the step itself plans and commits them."""
    ctx = Context.load(root, params_path, profile, parent_run_id)

    def map_units(plans: list[str]) -> list[dict]:
        futures = cache_unit.map(unmapped(root), unmapped(params_path), unmapped(profile), plans)
        return [f.result() for f in futures]

    ctx.map_units = map_units
    return run_step("cache_features", ctx, reuse=not force)


def cache_features(root: str, params_path: str, profile: str, parent_run_id: str | None, force: bool = False) -> dict:
    """Called like every step task; runs the subflow on the task runner params.yaml chooses."""
    runner = task_runner(Context.load(root, params_path, profile).params.features)
    return cache_features_flow.with_options(task_runner=runner)(root, params_path, profile, parent_run_id, force)


cache_features.name = "cache_features"
