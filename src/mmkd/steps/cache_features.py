"""Owns the `cache_features` step: every registry teacher's features of the curated corpus, into the store."""

from __future__ import annotations

import json
from functools import lru_cache

from mmkd.steps.common import Context, StepRun, seed_everything
from mmkd.steps.teachers import load_teachers


def _entries(loaded) -> list:
    from mmkd.features.cache import TeacherEntry

    return [TeacherEntry(spec.name, enc.version, enc.embed_dim, tuple(spec.modalities)) for spec, enc in loaded]


@lru_cache(maxsize=4)
def _worker_teachers(root: str, params_path: str, profile: str) -> dict:
    """Teachers loaded once per worker process (a Dask worker runs many units)."""
    ctx = Context.load(root, params_path, profile)
    return {spec.name: enc for spec, enc in load_teachers(ctx)}


def cache_unit(root: str, params_path: str, profile: str, plan_path: str) -> dict:
    """Run one planned unit in this process (a Prefect task on any executor); the driver commits it."""
    from mmkd.features.cache import run_unit

    ctx = Context.load(root, params_path, profile)
    f = ctx.params.features
    seed_everything(ctx.params.seed, f.dask.threads_per_worker if f.executor == "dask" else ctx.params.threads)
    return run_unit(plan_path, ctx.ws.curated, ctx.ws.teacher_features, _worker_teachers(root, params_path, profile),
                    f.batch_size, f.dtype, f.decode_workers)


def step_cache_features(ctx: Context, run: StepRun) -> dict:
    from mmkd.features.cache import commit_unit, forwarded, plan_units, run_unit
    from mmkd.features.store import FeatureStore
    from mmkd.progress import progress

    ws, f = ctx.ws, ctx.params.features
    run.log_params({"features": f.model_dump()})
    store = FeatureStore(ws.teacher_features, create=True)
    recovered = store.adopt()  # shards a killed run finished but did not index; half-written files removed
    loaded = load_teachers(ctx)
    for spec, enc in loaded:
        store.register_set(spec.name, enc.version, enc.embed_dim, f.dtype,
                           {"loader": spec.loader, "source": spec.source, "model": spec.model,
                            "modalities": spec.modalities, "preprocess": enc.spec.as_dict()})
    plans = plan_units(ws.curated, store, _entries(loaded), f.unit_records, f.coverage)
    results = []
    if ctx.map_units is not None:  # the Prefect flow: units as mapped tasks on its task runner (threads or Dask)
        for res in ctx.map_units([str(pl) for pl in plans]):
            commit_unit(store, res)
            results.append(res)
    else:
        encoders = {spec.name: enc for spec, enc in loaded}
        todo = sum(len(json.loads(pl.read_text())["records"]) for pl in plans)
        with progress(total=todo, desc="cache_features", unit="pair") as bar:
            for pl in plans:  # committed one by one: a kill loses at most the unit in flight
                res = run_unit(pl, ws.curated, store.root, encoders, f.batch_size, f.dtype, f.decode_workers, bar.update)
                commit_unit(store, res)
                results.append(res)
    pruned = store.prune({(spec.name, enc.version) for spec, enc in loaded}) if f.prune_stale else []
    summary = feature_summary(ctx, store, loaded)
    store.close()
    # features.json is DVC-tracked content: what the store holds, never how long it took
    (ws.teacher_features / "features.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    done = forwarded(results)
    metrics = {"units": len(results), **recovered, "pruned_sets": len(pruned),
               **{f"forwarded_{spec.name}": done.get(spec.name, 0) for spec, _ in loaded},
               **{f"rows_{t}": s["rows"] for t, s in summary["teachers"].items()}, "store_bytes": summary["bytes"]}
    run.log_metrics(metrics)
    run.log_artifact(ws.teacher_features / "features.json")
    return metrics


def feature_summary(ctx: Context, store, loaded) -> dict:
    """Per teacher: version, dim, dtype, rows, shards and coverage of each curated split."""
    import numpy as np

    from mmkd.data.store import split_records
    from mmkd.data.splits import SPLITS

    keys = {s: np.array([r["key"] for r in split_records(ctx.ws.curated, s)], dtype="S32") for s in SPLITS}
    stats = store.stats(keys)
    current = {(spec.name, enc.version) for spec, enc in loaded}
    teachers = {s["teacher"]: {k: s[k] for k in ("version", "dim", "dtype", "rows", "shards", "coverage")}
                for s in stats["sets"] if (s["teacher"], s["version"]) in current}
    return {"teachers": teachers, "bytes": stats["bytes"] - (store.root / "index.sqlite").stat().st_size,
            "dtype": ctx.params.features.dtype}
