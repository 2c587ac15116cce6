"""Owns the `align` step: every teacher's features mapped into the student's space, and that space measured."""

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


def _split(ctx: Context, name: str, labelled: bool = False):
    """(records as a SplitTable, its Split); class labels only where asked (the probe split's diagnostic)."""
    from mmkd.data.split_table import SplitTable
    from mmkd.features.align import Split

    table = SplitTable(ctx.ws.curated, name)
    return table, Split(table.keys, table.modality_of("unknown"), table.findings() if labelled else None)


def step_align(ctx: Context, run: StepRun) -> dict:
    import shutil

    # the stage-1 student's train embeddings go to disk here, beside the output (which align rebuilds whole) and
    # are read back chunk by chunk; removed when the step ends (and at its start: a killed run's leftovers)
    scratch = ctx.ws.aligned_features.parent / ".align-student"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        return _align(ctx, run, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _align(ctx: Context, run: StepRun, scratch) -> dict:
    from mmkd.data.splits import SPLITS
    from mmkd.features import diagnostics
    from mmkd.features.align import KeyModality, align, student_embeddings
    from mmkd.models.factory import model_config
    from mmkd.steps.common import _device

    p, ws = ctx.params, ctx.ws
    run.log_params({"align": p.align.model_dump(), "student_model": p.pretrain.model})
    latent = model_config(p.pretrain.model)["embed_dim"]
    records, train = _split(ctx, "train")
    _, probe = _split(ctx, "probe", labelled=True)
    student = None
    if p.align.method != "autoencoder" or p.align.anchor_weight > 0 or len(probe.keys):
        # the anchor of the shared space, and of the Procrustes baseline the diagnostic compares against
        student = student_embeddings(ws.stage1, ws.curated, records, _device(ctx), scratch)
    del records  # its captions: only the embeddings needed them
    domains = {s.name: list(s.modalities) for s in p.teachers.registry}
    modality_of = KeyModality.read(ws.curated, SPLITS)  # it picks the per-modality map that projects each key
    stats = align(ws.teacher_features, current_sets(ctx), train, ws.aligned_features, latent, p.align, p.seed,
                  p.features.dtype, domains, student, probe if len(probe.keys) else None, modality_of)
    if student is not None:
        student.close()
    space = stats.pop("space", None)
    atomic.write_json(ws.aligned_features / "aligned.json",
                      {"projector": stats["projector"], "method": stats["method"], "latent_dim": latent,
                       "rows": stats["projected_rows"]})
    run.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    if space is not None:
        atomic.write_json(ws.aligned_features / "diagnostics.json", {"method": stats["method"], **space},
                          sort_keys=True)
        metrics = diagnostics.metric_items(space["aligned"]["pairs"], "space")
        if "procrustes" in space:
            metrics.update(diagnostics.metric_items(space["procrustes"]["pairs"], "space_procrustes"))
        for t, q in space["aligned"]["quality"].items():
            metrics[f"space.quality.{t}"] = q
            metrics[f"space.quality_raw.{t}"] = space["raw_quality"][t]
        run.log_metrics({k: v for k, v in metrics.items() if v == v})  # NaN (not measurable) is not logged
        run.log_artifact(ws.aligned_features / "diagnostics.json")
        stats["space"] = space["aligned"]["summary"]
    run.log_artifact(ws.aligned_features / "projector" / "projector.json")
    return stats
