"""Owns the `synth` step: generate the embedded synthetic corpus under data/."""

from __future__ import annotations

import shutil

from mmkd.steps.common import Context, StepRun


def step_synth(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.synth import generate

    p = ctx.params
    run.log_params({"synth": p.synth.model_dump()})
    if ctx.ws.data.exists():
        shutil.rmtree(ctx.ws.data)
    summary = generate(p.synth, p.seed, ctx.ws.data)
    run.log_metrics(summary)
    return summary
