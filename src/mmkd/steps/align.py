"""Owns the `align` step: the multi-teacher projector, trained over the store, and the projected features."""

from __future__ import annotations

import json

from mmkd import atomic
from mmkd.steps.common import Context, StepRun


def current_sets(ctx: Context) -> list[tuple[str, str]]:
    """(teacher, version) of every registry teacher, as cache_features recorded them (no teacher is loaded)."""
    from mmkd.features.store import FeatureError

    path = ctx.ws.teacher_features / "features.json"
    if not path.exists():
        raise FeatureError(f"{path} missing; run the `cache_features` step first")
    held = json.loads(path.read_text())["teachers"]
    missing = [s.name for s in ctx.params.teachers.registry if s.name not in held]
    if missing:
        raise FeatureError(f"teachers {missing} have no features in {ctx.ws.teacher_features}; run cache_features")
    return [(s.name, held[s.name]["version"]) for s in ctx.params.teachers.registry]


def step_align(ctx: Context, run: StepRun) -> dict:
    import numpy as np

    from mmkd.data.store import split_records
    from mmkd.features.align import align
    from mmkd.models.factory import model_config

    p, ws = ctx.params, ctx.ws
    run.log_params({"align": p.align.model_dump(), "student_model": p.pretrain.model})
    latent = model_config(p.pretrain.model)["embed_dim"]
    keys = np.array([r["key"] for r in split_records(ws.curated, "train")], dtype="S32")
    stats = align(ws.teacher_features, current_sets(ctx), keys, ws.aligned_features, latent, p.align, p.seed,
                  p.features.dtype)
    atomic.write_json(ws.aligned_features / "aligned.json",
                      {"projector": stats["projector"], "latent_dim": latent, "rows": stats["projected_rows"]})
    run.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    run.log_artifact(ws.aligned_features / "projector" / "projector.json")
    return stats
