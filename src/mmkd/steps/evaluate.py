"""Owns the `evaluate` step: every model on every selected dataset, one unit per (model, dataset), then reports."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mmkd.steps.common import Context, StepRun, _device
from mmkd import atomic

log = logging.getLogger("mmkd")
# models and the datasets in use, shared by the units of one evaluate step (they run in its process, evaluate.workers
# at once, dataset by dataset); None outside a step, so nothing outlives the weights it was loaded from
_SESSION: "Session | None" = None


def select_entries(ctx: Context) -> tuple[list, dict[str, str]]:
    """(catalog entries to evaluate, missing name -> where it was looked for and how to get it).
    `embedded` selects the synthetic suite, `present` every catalog entry found on disk; unknown names fail.
    An incomplete dataset (some files missing) is evaluated: its loader refuses the bad records with reasons, or
    its units fail with the error; only what is absent is skipped."""
    from mmkd.evaluation.catalog import load_catalog, resolve, status, suite_entries

    p = ctx.params
    embedded = suite_entries(p) if p.synth.eval_suite.enabled else []
    catalog = {e.name: e for e in [*embedded, *load_catalog()]}
    chosen: dict[str, object] = {}
    for name in p.evaluate.datasets:
        if name == "embedded":
            chosen.update({e.name: e for e in embedded})
        elif name == "present":
            chosen.update({e.name: e for e in catalog.values()
                           if status(e, resolve(e, ctx.ws.eval_data, ctx.ws.embedded_suite))[0] == "present"})
        elif name in catalog:
            chosen[name] = catalog[name]
        else:
            raise KeyError(f"evaluate.datasets: unknown dataset '{name}'; `mmkd datasets list` shows the catalog")
    present, missing = [], {}
    for e in chosen.values():
        folder = resolve(e, ctx.ws.eval_data, ctx.ws.embedded_suite)
        state, detail = status(e, folder)
        if state == "missing":
            missing[e.name] = f"{state}: {detail}"
        else:
            present.append(e)
        if state != "present":
            log.warning("evaluate: dataset %s is %s: %s", e.name, state, detail)
    return present, missing


def plan_evaluation(ctx: Context) -> dict:
    """Models and datasets of this evaluation, written to artifacts/evaluation/plan.json for the units."""
    entries, missing = select_entries(ctx)
    models = []
    for name in ctx.params.evaluate.models:
        if name == "teachers":
            models += [{"name": s.name, "kind": "teacher", "domain": list(s.modalities)}
                       for s in ctx.params.teachers.registry]
        else:
            models.append({"name": name, "kind": "student", "domain": None})
    datasets = [{"name": e.name, "modalities": list(e.modalities),
                 "modality": e.modalities[0] if len(e.modalities) == 1 else "mixed", "tasks": list(e.tasks)}
                for e in entries]
    e = ctx.params.evaluate
    settings = {"seed": ctx.params.seed, "recall_k": e.recall_k, "probe": e.probe.model_dump(), "folds": e.folds,
                "head_seeds": e.head_seeds}
    plan = {"models": models, "datasets": datasets, "missing": missing, "settings": settings}
    out = ctx.ws.evaluation
    shutil.rmtree(out / "results", ignore_errors=True)  # a unit's result is this run's, or absent
    shutil.rmtree(out / "rejected", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "plan.json", plan)
    return plan


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_model(ctx: Context, name: str):
    """(encoder, weights version) of a student folder or a registry teacher."""
    import open_clip

    from mmkd.models.encoder import ClipEncoder
    from mmkd.models.factory import load_checkpoint
    from mmkd.teachers.registry import load_teacher

    device = _device(ctx)
    folders = {"student": ctx.ws.student, "student_stage1": ctx.ws.stage1}
    if name in folders:
        model, meta = load_checkpoint(folders[name], device)
        enc = ClipEncoder(name, model, open_clip.get_tokenizer(meta["model"]), device)
        return enc, _file_sha(folders[name] / "model.safetensors")
    spec = next((s for s in ctx.params.teachers.registry if s.name == name), None)
    if spec is None:
        raise KeyError(f"evaluate: '{name}' is neither a student nor a teacher of the registry")
    enc = load_teacher(spec, ctx.ws.teachers, device)
    return enc, enc.version


def _entry(ctx: Context, name: str):
    from mmkd.evaluation.catalog import load_catalog, suite_entries

    for e in [*suite_entries(ctx.params), *load_catalog()]:
        if e.name == name:
            return e
    raise KeyError(f"evaluate: dataset '{name}' is not in the catalog")


def _load(ctx: Context, entry):
    from mmkd.evaluation.catalog import load_dataset, resolve

    ds = load_dataset(entry, resolve(entry, ctx.ws.eval_data, ctx.ws.embedded_suite))
    if ds.rejected:  # kept with their reasons (reports/evaluation.json counts them), never dropped silently
        path = ctx.ws.evaluation / "rejected" / f"{entry.name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, "".join(json.dumps({"record": r, "reason": why}) + "\n" for r, why in ds.rejected))
        log.warning("evaluate: %s: %d records refused (%s), e.g. %s: %s", entry.name, len(ds.rejected), path,
                    *ds.rejected[0])
    return ds


def _cache_dir(ctx: Context) -> Path | None:
    return ctx.ws.evaluation / "embeddings" if ctx.params.evaluate.cache_embeddings else None


class Session:
    """What the units of one evaluate step share, safe for the worker threads that run them: every model, loaded
    once, and the datasets being evaluated, each decoded and fingerprinted once for all models. At most `keep`
    datasets stay referenced (units run dataset by dataset, `workers` at once: the last `workers` datasets); a
    thread still using an evicted one keeps its own reference."""

    def __init__(self, keep: int = 1):
        self.keep = max(1, keep)
        self._lock = threading.Lock()
        self._models: dict[str, dict] = {}
        self._datasets: dict[str, dict] = {}  # insertion order = age

    def _slot(self, table: dict, name: str, evict: bool) -> dict:
        with self._lock:
            slot = table.get(name)
            if slot is None:
                slot = table[name] = {"lock": threading.Lock()}
                while evict and len(table) > self.keep:
                    table.pop(next(iter(table)))
            return slot

    def _get(self, table: dict, name: str, load, evict: bool):
        slot = self._slot(table, name, evict)
        with slot["lock"]:  # one thread loads it; another asking for the same one waits for that load
            if "value" not in slot:
                slot["value"] = load()
            return slot["value"]

    def model(self, ctx: Context, name: str):
        return self._get(self._models, name, lambda: load_model(ctx, name), evict=False)

    def dataset(self, ctx: Context, name: str):
        """(entry, dataset, decoded images, content fingerprint)."""
        return self._get(self._datasets, name, lambda: _decode_dataset(ctx, name), evict=True)


def _decode_dataset(ctx: Context, name: str):
    from mmkd.evaluation.run import dataset_fingerprint

    entry = _entry(ctx, name)
    ds = _load(ctx, entry)
    # slide tiles (lazy) are read per tile as encoded: a slide set's tiles never all sit in memory
    decoded = None if getattr(ds.images, "lazy", False) else [ds.images.load(i) for i in range(len(ds.images))]
    return entry, ds, decoded, dataset_fingerprint(ds, entry)


def run_unit(ctx: Context, model: str, dataset: str) -> dict:
    """One (model, dataset) unit (a Prefect mapped task, or a step of the in-process loop): evaluate, write."""
    from mmkd.evaluation.run import evaluate_pair, write_result

    session = _SESSION if _SESSION is not None else Session()
    entry, ds, images, fingerprint = session.dataset(ctx, dataset)
    encoder, version = session.model(ctx, model)
    res = evaluate_pair(encoder, version, entry, ds, ctx.params.evaluate, ctx.params.seed, _cache_dir(ctx), images)
    write_result(ctx.ws.evaluation / "results", model, dataset, {**res, "dataset_fingerprint": fingerprint})
    return {"model": model, "dataset": dataset, "seconds": res["seconds"]}


def record_failure(ctx: Context, model: str, dataset: str, error: str) -> None:
    from mmkd.evaluation.run import write_result

    log.error("evaluate: %s on %s failed: %s", model, dataset, error)
    write_result(ctx.ws.evaluation / "results", model, dataset, {"error": error})


def _run_in_process(ctx: Context, units: list[tuple[str, str]]) -> None:
    """The units in order, evaluate.workers at once; a failing one is recorded and the others go on."""
    def one(unit: tuple[str, str]) -> None:
        try:
            run_unit(ctx, *unit)
        except Exception as e:
            record_failure(ctx, *unit, f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(ctx.params.evaluate.workers, thread_name_prefix="evaluate") as pool:
        list(pool.map(one, units))


def unit_threads(ctx: Context) -> int:
    """torch threads per unit: the step's `threads` shared by the units running at once. Small models on small
    batches use two cores better as two units of one thread than as one unit of two, and the heads' fits and the
    bootstrap (numpy, scikit-learn) use one core whatever torch is given."""
    return max(1, ctx.params.threads // ctx.params.evaluate.workers)


def data_checks(ctx: Context, plan: dict) -> dict:
    """What the report says about the evaluated data itself: its images found in the curated training store
    (mmkd.data.contamination; hashes cached, so cheap after curation checked them) and the datasets whose splits
    are not by patient (the catalog's split_by)."""
    from mmkd.data.contamination import contamination_summary

    names = [d["name"] for d in plan["datasets"]]
    try:
        contamination = contamination_summary(ctx.params, ctx.ws, names)
    except (OSError, ValueError, KeyError) as exc:  # no curated store (an evaluation-only workspace): say so
        contamination = {"error": f"{type(exc).__name__}: {exc}"}
    flagged = {}
    for name in names:
        entry = _entry(ctx, name)
        if entry.split_flagged:
            flagged[name] = entry.split_by or "undeclared"
    return {"contamination": contamination, "split_not_by_patient": flagged}


def step_evaluate(ctx: Context, run: StepRun) -> dict:
    from mmkd.evaluation.report import planned_units, write_reports

    p, ws = ctx.params, ctx.ws
    run.log_params({"evaluate": p.evaluate.model_dump()})
    t0 = time.perf_counter()
    plan = plan_evaluation(ctx)
    if not plan["datasets"]:
        raise FileNotFoundError("evaluate: none of evaluate.datasets is present: "
                                + "; ".join(f"{k} ({v})" for k, v in plan["missing"].items()))
    units = planned_units(plan)
    global _SESSION
    _SESSION = Session(keep=p.evaluate.workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(unit_threads(ctx))  # worker threads take the process's setting when they start
    try:
        if ctx.map_eval_units is not None:  # the Prefect flow: one mapped task per unit, failures recorded by it
            ctx.map_eval_units(units)
        else:
            _run_in_process(ctx, units)
    finally:
        _SESSION = None
        torch.set_num_threads(threads)
    out = write_reports(plan, ws.evaluation / "results", ws.metrics, ws.leaderboard, ws.plots,
                        ws.evaluation_report, ws.evaluation / "rejected", data_checks=data_checks(ctx, plan))
    seconds = time.perf_counter() - t0
    for model_name, per in out["metrics"].items():
        # the gain is no model: `gain/...` keeps it out of the `<model>.<dataset>.<metric>` names history reads
        fmt = "gain/{d}.{k}" if model_name == "gain" else f"{model_name}.{{d}}.{{k}}"
        run.log_metrics({fmt.format(d=d, k=k): v for d, m in per.items() for k, v in m.items()})
    contamination = out["status"]["data_checks"]["contamination"]
    if "totals" in contamination:
        run.log_metrics({f"contamination.{kind}.{split}": n for kind, per in contamination["totals"].items()
                         for split, n in per.items()})
    run.log_metrics({"evaluation_seconds": seconds, "evaluation_units": len(units),
                     "evaluation_failed_units": len(out["status"]["failed"]),
                     "evaluation_missing_datasets": len(plan["missing"])})
    for path in (ws.metrics, ws.leaderboard, ws.evaluation_report, *out["plots"]):
        run.log_artifact(path)
    failed = out["status"]["failed"]
    if failed and len(failed) == len(units):
        raise RuntimeError(f"evaluate: every unit failed, e.g. {next(iter(failed.items()))}")
    return {"seconds": round(seconds, 1), "units": len(units), "failed": failed, "missing": plan["missing"],
            "evaluation_id": out["status"]["evaluation_id"],
            **{m: per["mean"] for m, per in out["metrics"].items() if "mean" in per}}
