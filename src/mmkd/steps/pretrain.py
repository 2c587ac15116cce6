"""Owns the `pretrain` step: stage-1 CLIP pretraining of the student (single process or one rank of torchrun)."""

from __future__ import annotations

from mmkd.steps.common import Context, _device, _metric_logger, StepRun


def step_pretrain(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.store import load_curated
    from mmkd.models.factory import input_size
    from mmkd.models.init import init_from_clip
    from mmkd.training.clip import train_clip

    p, ws = ctx.params, ctx.ws
    run.log_params({"pretrain": p.pretrain.model_dump()})
    records, images = load_curated(ws.curated, "train", input_size(p.pretrain.model))
    init = p.pretrain.init
    start = (lambda model: init_from_clip(model, init.source, tuple(init.towers))) if init else None
    hist = train_clip(p.pretrain.model, images, [r["caption"] for r in records], p.pretrain.train, p.seed,
                      _device(ctx), ws.stage1, "pretrain", _metric_logger(run, "train"), {"stage": 1},
                      state_dir=ws.train_state("pretrain"), init=start, keys=[r["key"] for r in records])
    run.log_metrics({f"final_{k}": v for k, v in hist.items() if isinstance(v, (int, float))})
    run.log_artifact(ws.stage1 / "model.json")
    return hist
