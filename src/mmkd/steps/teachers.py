"""Owns the `teachers` step: train the embedded teachers; and loading every registry teacher."""

from __future__ import annotations

import json

import numpy as np

from mmkd.steps.common import Context, _device, _metric_logger, StepRun


def step_teachers(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.store import open_images, split_records
    from mmkd.models.factory import input_size
    from mmkd.training.clip import train_clip

    p, ws = ctx.params, ctx.ws
    run.log_params({"teachers": p.teachers.model_dump()})
    records = split_records(ws.curated, "train")
    out: dict = {}
    ws.teachers.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(p.teachers.registry):
        if spec.loader != "embedded":
            out[spec.name] = {"loader": spec.loader, "trained": False}  # external teachers arrive pretrained
            continue
        rows = np.array([j for j, r in enumerate(records) if r["modality"] in spec.modalities])
        if len(rows) < 2:
            raise ValueError(f"teacher '{spec.name}': only {len(rows)} curated train pairs in {spec.modalities}")
        images = open_images(ws.curated, records, input_size(spec.model))  # at the teacher's own input size
        hist = train_clip(spec.model, images.subset(rows), [records[j]["caption"] for j in rows], p.teachers.train,
                          p.seed + 100 + i, _device(ctx), ws.teachers / spec.name, f"teacher {spec.name}",
                          _metric_logger(run, spec.name), {"teacher": spec.name, "modalities": spec.modalities})
        # teachers.json is a DVC output: keep it free of timings so a repeated run gives the same bytes
        out[spec.name] = {"loader": "embedded", "trained": True, **{k: hist[k] for k in ("loss", "steps", "pairs")}}
        run.log_metrics({f"{spec.name}.final_loss": hist["loss"], f"{spec.name}.pairs": hist["pairs"],
                         f"{spec.name}.train_seconds": hist["train_seconds"]})
    (ws.teachers / "teachers.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    run.log_artifact(ws.teachers / "teachers.json")
    return out


def load_teachers(ctx: Context):
    from mmkd.teachers.registry import load_teacher

    return [(spec, load_teacher(spec, ctx.ws.teachers, _device(ctx))) for spec in ctx.params.teachers.registry]
