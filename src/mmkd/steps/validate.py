"""Owns the `validate` step: the Great Expectations suite over the curated store."""

from __future__ import annotations

from mmkd.steps.common import Context, StepRun


def step_validate(ctx: Context, run: StepRun) -> dict:
    from mmkd.validation.suite import validate

    p, ws = ctx.params, ctx.ws
    run.log_params({"validate": p.validate_.model_dump()})
    docs = ws.reports / "data_docs"
    try:
        summary = validate(ws.curated, p.curate, p.validate_, docs, ws.validation_report, p.synth.modalities)
    finally:
        run.log_artifact(ws.validation_report)
    run.log_metrics({"expectations": summary["evaluated"], "failed": summary["failed"]})
    run.log_artifact(docs, "data_docs")
    return summary
