"""Owns the `evaluate` step: students and teachers on the held-out sets -> metrics and leaderboard."""

from __future__ import annotations

import json

from mmkd.steps.common import Context, _device, StepRun
from mmkd.steps.teachers import load_teachers


def step_evaluate(ctx: Context, run: StepRun) -> dict:
    import open_clip

    from mmkd.evaluation.evaluate import Candidate, evaluate, leaderboard, write_reports
    from mmkd.features.cache import load_split
    from mmkd.data.store import split_records
    from mmkd.models.encoder import ClipEncoder
    from mmkd.models.factory import load_checkpoint

    p, ws = ctx.params, ctx.ws
    run.log_params({"evaluate": p.evaluate.model_dump()})
    device = _device(ctx)
    tasks = json.loads((ws.curated / "tasks.json").read_text())
    candidates = []
    for name, folder in (("student", ws.student), ("student_stage1", ws.stage1)):
        model, meta = load_checkpoint(folder, device)
        candidates.append(Candidate(name, ClipEncoder(name, model, open_clip.get_tokenizer(meta["model"]), device), "student"))
    ids = {s: [r["id"] for r in split_records(ws.curated, s)] for s in ("probe", "test")}
    cached = {s: load_split(ws.features, s, ids[s]) for s in ids}
    for spec, enc in load_teachers(ctx):
        emb = {s: {k: cached[s][spec.name][k].numpy() for k in ("image", "text")} for s in ids}
        candidates.append(Candidate(spec.name, enc, "teacher", spec.modalities, emb))
    results = evaluate(candidates, ws.curated, tasks, p.evaluate.recall_k, p.evaluate.linear_probe_c, p.seed,
                       p.evaluate.batch_size)
    board = leaderboard(results, candidates)
    write_reports(results, board, ws.metrics, ws.leaderboard)
    for model_name, per in results.items():
        run.log_metrics({f"{model_name}.{d}.{k}": v for d, m in per.items() for k, v in m.items()})
    run.log_artifact(ws.metrics)
    run.log_artifact(ws.leaderboard)
    return {m: per["mean"] for m, per in results.items()}
