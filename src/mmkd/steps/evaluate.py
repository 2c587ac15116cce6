"""Owns the `evaluate` step: students and teachers on the held-out sets -> metrics and leaderboard."""

from __future__ import annotations

import json

from mmkd.steps.common import Context, _device, StepRun
from mmkd.steps.teachers import load_teachers


def step_evaluate(ctx: Context, run: StepRun) -> dict:
    import open_clip

    from mmkd.evaluation.evaluate import Candidate, evaluate, leaderboard, write_reports
    from mmkd.data.store import split_records
    from mmkd.features.store import FeatureStore
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
    held = {s: split_records(ws.curated, s) for s in ("probe", "test")}
    store = FeatureStore(ws.teacher_features)
    for spec, enc in load_teachers(ctx):  # teachers embed the prompts; their held-out embeddings come from the store
        emb = {s: teacher_embeddings(store, spec.name, enc.version, enc.embed_dim, recs) for s, recs in held.items()}
        candidates.append(Candidate(spec.name, enc, "teacher", spec.modalities, emb))
    store.close()
    results = evaluate(candidates, ws.curated, tasks, p.evaluate.recall_k, p.evaluate.linear_probe_c, p.seed,
                       p.evaluate.batch_size)
    board = leaderboard(results, candidates)
    write_reports(results, board, ws.metrics, ws.leaderboard)
    for model_name, per in results.items():
        run.log_metrics({f"{model_name}.{d}.{k}": v for d, m in per.items() for k, v in m.items()})
    run.log_artifact(ws.metrics)
    run.log_artifact(ws.leaderboard)
    return {m: per["mean"] for m, per in results.items()}


def teacher_embeddings(store, teacher: str, version: str, dim: int, records: list[dict]) -> dict:
    """One split's cached image and text embeddings of a teacher; every record must be covered."""
    import numpy as np

    from mmkd.features.store import FeatureError

    shard, row = store.locate(teacher, version, np.array([r["key"] for r in records], dtype="S32"))
    if (shard < 0).any():
        first = records[int(np.flatnonzero(shard < 0)[0])]
        raise FeatureError(f"teacher '{teacher}' version {version}: no cached features for held-out sample "
                           f"'{first['id']}' ({int((shard < 0).sum())} missing); run cache_features")
    image, text = store.gather(shard, row, dim)
    return {"image": image, "text": text}
