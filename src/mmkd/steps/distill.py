"""Owns the `distill` step: stage-2 multi-teacher distillation from the aligned feature store."""

from __future__ import annotations

from mmkd.steps.common import Context, _device, _metric_logger, StepRun


def step_distill(ctx: Context, run: StepRun) -> dict:
    from mmkd.training.distill import distill

    p, ws = ctx.params, ctx.ws
    run.log_params({"distill": p.distill.model_dump()})
    domains = {spec.name: list(spec.modalities) for spec in p.teachers.registry}
    hist = distill(ws.stage1, ws.curated, ws.aligned_features, domains, p.distill, p.seed, _device(ctx), ws.student,
                   _metric_logger(run, "train"))
    run.log_metrics({f"final_{k}": v for k, v in hist.items()})
    run.log_artifact(ws.student / "model.json")
    return hist
