"""Owns the `pretrain` step: stage-1 CLIP pretraining of the student (single process or one rank of torchrun)."""

from __future__ import annotations

from mmkd.steps.common import Context, _device, _metric_logger, StepRun


def step_pretrain(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.split_table import SplitTable
    from mmkd.data.store import open_images
    from mmkd.models.factory import input_size
    from mmkd.models.init import init_from_clip
    from mmkd.training.clip import train_clip

    p, ws = ctx.params, ctx.ws
    run.log_params({"pretrain": p.pretrain.model_dump()})
    records = SplitTable(ws.curated, "train")  # columns and line offsets: captions are read per batch
    images = open_images(ws.curated, records, input_size(p.pretrain.model))
    init = p.pretrain.init
    start = (lambda model: init_from_clip(model, init.source, tuple(init.towers))) if init else None
    hist = train_clip(p.pretrain.model, images, records.captions(), p.pretrain.train, p.seed,
                      _device(ctx), ws.stage1, "pretrain", _metric_logger(run, "train"), {"stage": 1},
                      state_dir=ws.train_state("pretrain"), init=start, keys=records.key_strings())
    run.log_metrics({f"final_{k}": v for k, v in hist.items() if isinstance(v, (int, float))})
    run.log_artifact(ws.stage1 / "model.json")
    return hist
