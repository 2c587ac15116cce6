"""Owns the pipeline steps: each binds params.yaml and the workspace to one library function and logs to MLflow.

The CLI (`mmkd stage NAME`), the DVC stages and the Prefect tasks all call `run_step`; nothing else runs a step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmkd.config import Params, Workspace, load_params
from mmkd.tracking.mlflow_runs import PARENT_ENV, StepRun, Tracker, data_hash, git_commit

log = logging.getLogger("mmkd")
PIPELINE = ("curate", "validate", "teachers", "cache_features", "pretrain", "distill", "evaluate", "register")


@dataclass
class Context:
    ws: Workspace
    params_path: Path
    parent_run_id: str | None = None

    @property
    def params(self) -> Params:
        return self.ws.params

    @classmethod
    def load(cls, root: str | Path = ".", params_path: str | Path | None = None, profile: str | None = None,
             parent_run_id: str | None = None) -> "Context":
        root = Path(root).resolve()
        params_path = Path(params_path) if params_path else root / "params.yaml"
        params = load_params(params_path, profile)
        return cls(Workspace(root, params), params_path.resolve(), parent_run_id or os.environ.get(PARENT_ENV))

    def tracker(self) -> Tracker:
        return Tracker(self.ws.root, self.params.tracking.experiment, self.params.tracking.tracking_uri)

    def tags(self, step: str) -> dict:
        return {"mmkd.step": step, "mmkd.profile": self.params.profile, "mmkd.seed": self.params.seed,
                "mlflow.source.git.commit": git_commit(self.ws.root),
                "mmkd.data_hash": data_hash(self.ws.root, self.ws.raw_manifest)}


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def _device(ctx: Context) -> torch.device:
    from mmkd.models.factory import resolve_device

    return resolve_device(ctx.params.device)


def _metric_logger(run: StepRun, prefix: str) -> Callable[[dict, int], None]:
    return lambda metrics, step: run.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step)


# ---------------------------------------------------------------- steps


def step_synth(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.synth import generate

    p = ctx.params
    run.log_params({"synth": p.synth.model_dump()})
    if ctx.ws.data.exists():
        shutil.rmtree(ctx.ws.data)
    summary = generate(p.synth, p.seed, ctx.ws.data)
    run.log_metrics(summary)
    return summary


def step_curate(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.curate import curate

    p, ws = ctx.params, ctx.ws
    run.log_params({"curate": p.curate.model_dump()})
    if ws.curated.exists():
        shutil.rmtree(ws.curated)
    summary = curate(ws.raw_manifest, ws.curated, p.curate)
    tasks = ws.data / "tasks.json"
    if not tasks.exists():
        raise FileNotFoundError(f"{tasks}: evaluation task definitions missing next to the manifest")
    shutil.copy(tasks, ws.curated / "tasks.json")
    run.log_metrics({"kept": summary["kept"], "quarantined": summary["quarantined"],
                     **{f"kept_{k}": v for k, v in summary["kept_per_split"].items()}})
    run.log_artifact(ws.curated / "quarantine.jsonl")
    run.log_artifact(ws.curated / "summary.json")
    if summary["quarantined"]:
        log.warning("curate: %d records quarantined (%s); see %s", summary["quarantined"],
                    summary["quarantine_reasons"], ws.curated / "quarantine.jsonl")
    return summary


def step_validate(ctx: Context, run: StepRun) -> dict:
    from mmkd.validation.suite import validate

    p, ws = ctx.params, ctx.ws
    run.log_params({"validate": p.validate_.model_dump()})
    docs = ws.reports / "data_docs"
    try:
        summary = validate(ws.curated, p.curate.image_size, p.validate_, docs, ws.validation_report)
    finally:
        run.log_artifact(ws.validation_report)
    run.log_metrics({"expectations": summary["evaluated"], "failed": summary["failed"]})
    run.log_artifact(docs, "data_docs")
    return summary


def step_teachers(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.curate import load_curated
    from mmkd.training.clip import train_clip

    p, ws = ctx.params, ctx.ws
    run.log_params({"teachers": p.teachers.model_dump()})
    records, images = load_curated(ws.curated, "train")
    out: dict = {}
    ws.teachers.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(p.teachers.registry):
        if spec.source != "embedded":
            out[spec.name] = {"source": spec.source, "trained": False}  # external teachers arrive pretrained
            continue
        rows = np.array([j for j, r in enumerate(records) if r["modality"] in spec.modalities])
        if len(rows) < 2:
            raise ValueError(f"teacher '{spec.name}': only {len(rows)} curated train pairs in {spec.modalities}")
        hist = train_clip(spec.model, images[rows], [records[j]["caption"] for j in rows], p.teachers.train,
                          p.seed + 100 + i, _device(ctx), ws.teachers / spec.name, f"teacher {spec.name}",
                          _metric_logger(run, spec.name), {"teacher": spec.name, "modalities": spec.modalities})
        # teachers.json is a DVC output: keep it free of timings so a repeated run gives the same bytes
        out[spec.name] = {"source": "embedded", "trained": True, **{k: hist[k] for k in ("loss", "steps", "pairs")}}
        run.log_metrics({f"{spec.name}.final_loss": hist["loss"], f"{spec.name}.pairs": hist["pairs"],
                         f"{spec.name}.train_seconds": hist["train_seconds"]})
    (ws.teachers / "teachers.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    run.log_artifact(ws.teachers / "teachers.json")
    return out


def load_teachers(ctx: Context):
    from mmkd.teachers.registry import load_teacher

    return [(spec, load_teacher(spec, ctx.ws.teachers, _device(ctx))) for spec in ctx.params.teachers.registry]


def step_cache_features(ctx: Context, run: StepRun) -> dict:
    from mmkd.features.cache import build_cache
    from mmkd.models.factory import model_config

    p, ws = ctx.params, ctx.ws
    run.log_params({"features": p.features.model_dump(), "student_model": p.pretrain.model})
    if ws.features.exists():
        shutil.rmtree(ws.features)
    latent = model_config(p.pretrain.model)["embed_dim"]
    stats = build_cache(ws.curated, ws.features, load_teachers(ctx), latent, p.features.projector, p.seed,
                        p.features.batch_size)
    run.log_metrics(stats)
    run.log_artifact(ws.features / "projector" / "projector.json")
    return stats


def step_pretrain(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.curate import load_curated
    from mmkd.training.clip import train_clip

    p, ws = ctx.params, ctx.ws
    run.log_params({"pretrain": p.pretrain.model_dump()})
    records, images = load_curated(ws.curated, "train")
    hist = train_clip(p.pretrain.model, images, [r["caption"] for r in records], p.pretrain.train, p.seed,
                      _device(ctx), ws.stage1, "pretrain", _metric_logger(run, "train"), {"stage": 1})
    run.log_metrics({f"final_{k}": v for k, v in hist.items()})
    run.log_artifact(ws.stage1 / "model.json")
    return hist


def step_distill(ctx: Context, run: StepRun) -> dict:
    from mmkd.training.distill import distill

    p, ws = ctx.params, ctx.ws
    run.log_params({"distill": p.distill.model_dump()})
    hist = distill(ws.stage1, ws.curated, ws.features, p.distill, p.seed, _device(ctx), ws.student,
                   _metric_logger(run, "train"))
    run.log_metrics({f"final_{k}": v for k, v in hist.items()})
    run.log_artifact(ws.student / "model.json")
    return hist


def step_evaluate(ctx: Context, run: StepRun) -> dict:
    import open_clip

    from mmkd.evaluation.evaluate import Candidate, evaluate, leaderboard, write_reports
    from mmkd.features.cache import load_split
    from mmkd.data.curate import load_curated
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
    ids = {s: [r["id"] for r in load_curated(ws.curated, s)[0]] for s in ("probe", "test")}
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


def step_register(ctx: Context, run: StepRun) -> dict:
    import mlflow

    from mmkd.tracking import pyfunc

    p, ws = ctx.params, ctx.ws
    cfg = p.register_
    run.log_params({"register": cfg.model_dump()})
    tracker = ctx.tracker()
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    metrics = json.loads(ws.metrics.read_text())
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="student", python_model=str(Path(pyfunc.__file__).with_name("student_model_code.py")),
            artifacts={"checkpoint": str(ws.student)}, signature=pyfunc.signature(),
            input_example=pyfunc.example_input(), code_paths=[str(Path(__file__).parent)],
            pip_requirements=["torch", "open_clip_torch", "safetensors", "pillow", "pandas", "numpy"],
            registered_model_name=cfg.model_name, await_registration_for=60,
            metadata={"profile": p.profile, "mean_metrics": metrics["student"]["mean"]})
    version = str(info.registered_model_version)
    tracker.client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    out = {"model_name": cfg.model_name, "version": version, "alias": cfg.alias, "run_id": run.run_id,
           "model_uri": f"models:/{cfg.model_name}@{cfg.alias}", "tracking_uri": tracker.uri}
    ws.registration.parent.mkdir(parents=True, exist_ok=True)
    ws.registration.write_text(json.dumps(out, indent=1, sort_keys=True))
    return out


STEPS: dict[str, Callable[[Context, StepRun], dict]] = {
    "synth": step_synth, "curate": step_curate, "validate": step_validate, "teachers": step_teachers,
    "cache_features": step_cache_features, "pretrain": step_pretrain, "distill": step_distill,
    "evaluate": step_evaluate, "register": step_register,
}


def run_step(name: str, ctx: Context) -> dict:
    """Run one step inside its own MLflow run (nested under ctx.parent_run_id when given)."""
    if name not in STEPS:
        raise KeyError(f"unknown step '{name}'; steps: {list(STEPS)}")
    seed_everything(ctx.params.seed, ctx.params.threads)
    tracker = ctx.tracker()
    t0 = time.perf_counter()
    with tracker.run(name, ctx.tags(name), ctx.parent_run_id) as run:
        summary = STEPS[name](ctx, run)
        seconds = time.perf_counter() - t0
        run.log_metrics({"step_seconds": seconds})
    log.info("step %s done in %.1fs", name, seconds)
    return {"step": name, "seconds": round(seconds, 2), "run_id": run.run_id, "summary": summary}


def start_pipeline(ctx: Context, entry: str) -> str:
    tracker = ctx.tracker()
    run = tracker.start(f"retrain-{ctx.params.profile}", {**ctx.tags("pipeline"), "mmkd.entry": entry})
    run.log_params({"profile": ctx.params.profile, "seed": ctx.params.seed, "params_file": str(ctx.params_path)})
    return run.run_id


def finish_pipeline(ctx: Context, run_id: str, ok: bool, summary: dict | None = None) -> None:
    tracker = ctx.tracker()
    run = StepRun(tracker.client, run_id)
    # data may have been generated inside the pipeline, after the parent run was tagged
    run.set_tags({"mmkd.data_hash": data_hash(ctx.ws.root, ctx.ws.raw_manifest)})
    if summary:
        run.log_metrics(summary)
    if ok and ctx.ws.leaderboard.exists():
        run.log_artifact(ctx.ws.leaderboard)
        run.log_artifact(ctx.ws.metrics)
    tracker.finish(run, ok)
