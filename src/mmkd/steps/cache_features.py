"""Owns the `cache_features` step: every teacher's features of every curated pair, and the projector."""

from __future__ import annotations

import shutil

from mmkd.steps.common import Context, StepRun
from mmkd.steps.teachers import load_teachers


def step_cache_features(ctx: Context, run: StepRun) -> dict:
    from mmkd.features.cache import build_cache
    from mmkd.models.factory import model_config

    p, ws = ctx.params, ctx.ws
    run.log_params({"features": p.features.model_dump(), "student_model": p.pretrain.model})
    if ws.features.exists():
        shutil.rmtree(ws.features)
    latent = model_config(p.pretrain.model)["embed_dim"]
    stats = build_cache(ws.curated, ws.features, load_teachers(ctx), latent, p.features.projector, p.seed,
                        p.features.batch_size)
    run.log_metrics(stats)
    run.log_artifact(ws.features / "projector" / "projector.json")
    return stats
