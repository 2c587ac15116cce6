"""Owns the `register` step: the student as an MLflow pyfunc model, aliased in the registry."""

from __future__ import annotations

import json
from pathlib import Path

from mmkd.steps.common import Context, StepRun


def step_register(ctx: Context, run: StepRun) -> dict:
    import mlflow

    from mmkd.tracking import pyfunc

    p, ws = ctx.params, ctx.ws
    cfg = p.register_
    run.log_params({"register": cfg.model_dump()})
    tracker = ctx.tracker()
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    metrics = json.loads(ws.metrics.read_text())
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="student", python_model=str(Path(pyfunc.__file__).with_name("student_model_code.py")),
            artifacts={"checkpoint": str(ws.student)}, signature=pyfunc.signature(),
            input_example=pyfunc.example_input(), code_paths=[str(Path(__file__).parents[1])],
            pip_requirements=["torch", "open_clip_torch", "safetensors", "pillow", "pandas", "numpy"],
            registered_model_name=cfg.model_name, await_registration_for=60,
            metadata={"profile": p.profile, "mean_metrics": metrics["student"]["mean"]})
    version = str(info.registered_model_version)
    tracker.client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    out = {"model_name": cfg.model_name, "version": version, "alias": cfg.alias, "run_id": run.run_id,
           "model_uri": f"models:/{cfg.model_name}@{cfg.alias}", "tracking_uri": tracker.uri}
    ws.registration.parent.mkdir(parents=True, exist_ok=True)
    ws.registration.write_text(json.dumps(out, indent=1, sort_keys=True))
    return out
