"""Owns the `distill` step: stage-2 multi-teacher distillation from the feature stores (distill.strategy)."""

from __future__ import annotations

from mmkd.steps.common import Context, _device, _metric_logger, StepRun


def step_distill(ctx: Context, run: StepRun) -> dict:
    from mmkd.steps.align import current_sets
    from mmkd.training.distill import WEIGHTS_FILE, distill

    p, ws = ctx.params, ctx.ws
    run.log_params({"distill": p.distill.model_dump()})
    domains = {spec.name: list(spec.modalities) for spec in p.teachers.registry}
    # routed and relational read the raw store: at the versions cache_features recorded
    reads_raw = p.distill.strategy in ("routed", "relational") or p.distill.modality_focus > 0
    raw = dict(current_sets(ctx)) if reads_raw else None
    hist = distill(ws.stage1, ws.curated, ws.aligned_features, domains, p.distill, p.seed, _device(ctx), ws.student,
                   _metric_logger(run, "train"), teacher_dir=ws.teacher_features, raw_versions=raw,
                   state_dir=ws.train_state("distill"))
    run.log_metrics({f"final_{k}": v for k, v in hist.items() if isinstance(v, (int, float))})
    run.log_artifact(ws.student / "model.json")
    run.log_artifact(ws.student / WEIGHTS_FILE)  # teacher shares; routed: the quality and weight tables
    return hist
