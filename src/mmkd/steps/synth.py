"""Owns the `synth` step: generate the embedded synthetic corpus under data/."""

from __future__ import annotations

import shutil

from mmkd.steps.common import Context, StepRun


def suite_missing(ctx: Context) -> bool:
    """The evaluation suite is enabled but not written (data/ from before it existed, or deleted)."""
    return ctx.params.synth.eval_suite.enabled and not (ctx.ws.embedded_suite / "suite.json").exists()


def step_synth(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.synth import generate

    p = ctx.params
    run.log_params({"synth": p.synth.model_dump()})
    if ctx.ws.raw_manifest.exists() and suite_missing(ctx):  # keep the corpus (and its DVC hash) as it is
        from mmkd.data.eval_suite import generate_suite

        summary = generate_suite(p.synth, p.seed, ctx.ws.embedded_suite)
        run.log_metrics(summary)
        return summary
    if ctx.ws.data.exists():
        shutil.rmtree(ctx.ws.data)
    summary = generate(p.synth, p.seed, ctx.ws.data)
    run.log_metrics(summary)
    return summary
