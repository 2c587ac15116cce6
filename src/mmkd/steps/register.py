"""Owns the `register` step: the student as an MLflow pyfunc model, the challenger, and champion if it passes the gate."""

from __future__ import annotations

import json

from mmkd.steps.common import Context, StepRun
from mmkd import atomic


def step_register(ctx: Context, run: StepRun) -> dict:
    from mmkd.tracking.gate import DATA_TAG, register_student
    from mmkd.tracking.mlflow_runs import data_hash

    p, ws = ctx.params, ctx.ws
    cfg = p.register_
    run.log_params({"register": cfg.model_dump()})
    tracker = ctx.tracker()
    metrics = json.loads(ws.metrics.read_text()) if ws.metrics.exists() else {}
    # the id of the evaluation the score comes from: a champion scored on another one is not compared
    evaluation = (json.loads(ws.evaluation_report.read_text()).get("evaluation_id")
                  if ws.evaluation_report.exists() else None)
    decision = register_student(
        tracker.uri, run.run_id, ws.student, ws.metrics, cfg.model_name, cfg.metric, cfg.higher_is_better,
        cfg.challenger_alias, cfg.champion_alias,
        metadata={"profile": p.profile, "mean_metrics": metrics.get("student", {}).get("mean")},
        evaluation=evaluation, serving=p.serving.model_dump(),  # the limits the served model enforces
        pipeline_run=ctx.parent_run_id)  # a retried register step of this pipeline run reuses its version
    # the data the version was trained on (data.dvc's hash): the dashboard's history of champions shows it
    data_version = data_hash(ws.root, ws.raw_manifest)
    tracker.client.set_model_version_tag(cfg.model_name, decision.version, DATA_TAG, data_version)
    d = {**decision.as_dict(), "data_version": data_version}
    run.log_metrics({"gate": {"challenger_score": decision.challenger_score, "champion_score": decision.champion_score,
                              "promoted": float(decision.promoted)}})
    run.set_tags({"mmkd.gate.decision": "promoted" if decision.promoted else "held", "mmkd.gate.reason": decision.reason,
                  "mmkd.gate.metric": decision.metric, "mmkd.model_version": decision.version,
                  "mmkd.champion_version": decision.champion_version, "mmkd.data_version": data_version})
    out = {**d, "run_id": run.run_id, "tracking_uri": tracker.uri,
           "model_uri": f"models:/{cfg.model_name}/{decision.version}",
           "champion_uri": f"models:/{cfg.model_name}@{cfg.champion_alias}"}
    ws.registration.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(ws.registration, out, sort_keys=True)
    return out
