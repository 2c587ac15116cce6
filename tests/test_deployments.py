"""The Prefect deployments: rendered from params.yaml, registered on a real server, run by a real worker."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mmkd.config import load_params
from mmkd.deployment import render_prefect_yaml
from tests.conftest import REPO

PREFECT = str(Path(sys.executable).parent / "prefect")


def _by_name(text: str) -> dict:
    return {d["name"]: d for d in yaml.safe_load(text)["deployments"]}


def test_prefect_yaml_matches_params_and_holds_the_three_deployments():
    params = load_params(REPO / "params.yaml")
    text = render_prefect_yaml(params)
    assert (REPO / "prefect.yaml").read_text() == text, "prefect.yaml is stale: run `mmkd deploy`"
    deps = _by_name(text)
    s = params.schedule
    assert set(deps) == {s.deployment, s.evaluate_deployment, s.inbox_deployment}
    assert deps[s.deployment]["schedules"] == [{"cron": s.cron, "timezone": s.timezone, "active": True}]
    assert deps[s.deployment]["parameters"] == {"profile": "default", "trigger": "schedule"}
    assert deps[s.evaluate_deployment]["schedules"] == []
    assert deps[s.inbox_deployment]["schedules"][0]["cron"] == s.inbox_cron
    assert {d["work_pool"]["name"] for d in deps.values()} == {s.work_pool}
    # one flow run per workspace: all three share a work queue (limit 1, set by `mmkd deploy --apply`), and each
    # deployment runs once at a time, a later run enqueued rather than dropped
    assert {d["work_pool"]["work_queue_name"] for d in deps.values()} == {s.work_queue}
    assert all(d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"} for d in deps.values())


def test_schedule_and_parameters_follow_params(tmp_path):
    text = (REPO / "params.yaml").read_text().replace('cron: "0 3 * * 1"', 'cron: "30 1 * * *"', 1)
    text = text.replace("profile: default", "profile: smoke", 1).replace("work_pool: mmkd-pool", "work_pool: gpu", 1)
    (tmp_path / "params.yaml").write_text(text)
    deps = _by_name(render_prefect_yaml(load_params(tmp_path / "params.yaml")))
    assert deps["weekly-retrain"]["schedules"][0]["cron"] == "30 1 * * *"
    assert all(d["parameters"]["profile"] == "smoke" and d["work_pool"]["name"] == "gpu" for d in deps.values())


def test_each_entrypoint_is_a_flow_that_accepts_its_parameters():
    for dep in _by_name((REPO / "prefect.yaml").read_text()).values():
        path, name = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        flow.validate_parameters(dep["parameters"])  # raises on an unknown or ill-typed parameter
        # transient failures only are retried; nothing with side effects is cached by Prefect
    from prefect.cache_policies import NO_CACHE

    from flows.retrain import PIPELINE_TASKS, with_retries
    from tasks import retry_if_transient

    params = load_params(REPO / "params.yaml")
    for task in PIPELINE_TASKS:
        task = with_retries(task, params.schedule)
        if hasattr(task, "cache_policy"):
            assert task.cache_policy is NO_CACHE and task.retries == params.schedule.retries
            assert task.retry_condition_fn is retry_if_transient


def test_deployments_register_on_a_server_and_a_worker_runs_one(prefect_harness, workspace):
    """`mmkd deploy --apply` against the server, then a worker (`mmkd worker --run-once`) runs the inbox flow."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api}
    mmkd = str(Path(sys.executable).parent / "mmkd")
    out = subprocess.run([mmkd, "deploy", "--apply", "--root", str(REPO)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    params = load_params(REPO / "params.yaml")
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name(f"retrain/{params.schedule.deployment}")
        assert [s.schedule.cron for s in retrain.schedules] == [params.schedule.cron]
        assert retrain.parameters == {"profile": "default", "trigger": "schedule"}
        inbox = client.read_deployment_by_name(f"inbox/{params.schedule.inbox_deployment}")
        assert [s.schedule.cron for s in inbox.schedules] == [params.schedule.inbox_cron]
        assert client.read_deployment_by_name(f"evaluate/{params.schedule.evaluate_deployment}").schedules == []
        queue = client.read_work_queue_by_name(params.schedule.work_queue, work_pool_name=params.schedule.work_pool)
        assert queue.concurrency_limit == 1  # one flow run at a time on the workspace, whichever deployment
        for dep in (retrain, inbox):
            assert dep.work_queue_name == params.schedule.work_queue
            strategy = dep.concurrency_options.collision_strategy
            assert dep.global_concurrency_limit.limit == 1 and getattr(strategy, "value", strategy) == "ENQUEUE"
    run = run_deployment(f"inbox/{params.schedule.inbox_deployment}", timeout=0,
                         parameters={"root": str(workspace), "profile": "smoke"})
    out = subprocess.run([mmkd, "worker", "--run-once", "--root", str(REPO)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state}: {out.stdout[-3000:]} {out.stderr[-3000:]}"
    assert "Failed to send telemetry" not in out.stdout + out.stderr
