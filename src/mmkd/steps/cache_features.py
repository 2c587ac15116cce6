"""Owns the `cache_features` step: every registry teacher's features of the curated corpus, into the store."""

from __future__ import annotations

import json
from pathlib import Path

from mmkd.steps.common import Context, StepRun, seed_everything
from mmkd.steps.teachers import load_teachers
from mmkd import atomic


_WORKER_TEACHERS: dict[tuple[str, str, str], dict] = {}


def _worker_teachers(root: str, params_path: str, profile: str, versions: dict[str, str]) -> dict:
    """Teachers loaded once per worker process (a Dask worker runs many units), reloaded when the plan names
    other versions (a long-lived worker outliving a retraining)."""
    key = (root, params_path, profile)
    held = _WORKER_TEACHERS.get(key)
    if held is None or any(t not in held or held[t].version != v for t, v in versions.items()):
        ctx = Context.load(root, params_path, profile)
        _WORKER_TEACHERS[key] = held = {spec.name: enc for spec, enc in load_teachers(ctx)}
    return held


def cache_unit(root: str, params_path: str, profile: str, plan_path: str) -> dict:
    """Run one planned unit in this process (a Prefect task on any executor); the driver commits it."""
    from mmkd.features.cache import run_unit

    ctx = Context.load(root, params_path, profile)
    f = ctx.params.features
    seed_everything(ctx.params.seed, f.dask.threads_per_worker if f.executor == "dask" else ctx.params.threads)
    versions = json.loads(Path(plan_path).read_text())["versions"]
    return run_unit(plan_path, ctx.ws.curated, ctx.ws.teacher_features,
                    _worker_teachers(root, params_path, profile, versions), f.batch_size, f.dtype, f.decode_workers)


def step_cache_features(ctx: Context, run: StepRun) -> dict:
    from mmkd.features.cache import cache_corpus
    from mmkd.features.store import FeatureStore

    ws, f = ctx.ws, ctx.params.features
    run.log_params({"features": f.model_dump()})
    loaded = load_teachers(ctx)
    # units mapped onto threads of this process reuse these encoders instead of loading every teacher again
    _WORKER_TEACHERS[(str(ws.root), str(ctx.params_path), ctx.params.profile)] = {s.name: e for s, e in loaded}
    done = cache_corpus(ws.curated, ws.teacher_features, loaded, f, ctx.map_units)
    store = FeatureStore(ws.teacher_features)
    summary = feature_summary(ctx, store, loaded)
    store.close()
    # features.json is DVC-tracked content: what the store holds, never how long it took
    atomic.write_json(ws.teacher_features / "features.json", summary, sort_keys=True)
    metrics = {"units": done["units"], "worker_processes": done["worker_processes"], "adopted_shards": done["adopted_shards"], "pruned_sets": len(done["pruned_sets"]),
               "removed_partial_files": done["removed_partial_files"], "store_bytes": summary["bytes"],
               **{f"forwarded_{spec.name}": done["forwarded"].get(spec.name, 0) for spec, _ in loaded},
               **{f"rows_{t}": s["rows"] for t, s in summary["teachers"].items()}}
    run.log_metrics(metrics)
    run.log_artifact(ws.teacher_features / "features.json")
    return metrics


def feature_summary(ctx: Context, store, loaded) -> dict:
    """Per teacher: version, dim, dtype, rows, shards and coverage of each curated split."""
    from mmkd.data.split_table import SplitTable
    from mmkd.data.splits import SPLITS

    keys = {s: SplitTable(ctx.ws.curated, s).keys for s in SPLITS}  # columns: no record dicts
    stats = store.stats(keys)
    current = {(spec.name, enc.version) for spec, enc in loaded}
    teachers = {s["teacher"]: {k: s[k] for k in ("version", "dim", "dtype", "rows", "shards", "coverage")}
                for s in stats["sets"] if (s["teacher"], s["version"]) in current}
    return {"teachers": teachers, "bytes": stats["bytes"] - (store.root / "index.sqlite").stat().st_size,
            "dtype": ctx.params.features.dtype}
