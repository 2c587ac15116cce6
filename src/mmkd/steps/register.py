"""Owns the `register` step: the student as an MLflow pyfunc model, the challenger, and champion if it passes the gate."""

from __future__ import annotations

import json
import time

from mmkd.steps.common import Context, StepRun, _device
from mmkd import atomic


def _selection(ctx: Context):
    """The selection items: the val split of the evaluated single-label zero-shot sets (the test split is the
    leaderboard's, never selected on)."""
    from mmkd.evaluation.catalog import resolve
    from mmkd.evaluation.selection import load_entries
    from mmkd.steps.evaluate import select_entries

    entries, _ = select_entries(ctx)  # what evaluate evaluated (missing sets were reported there)
    return load_entries(entries, lambda e: resolve(e, ctx.ws.eval_data, ctx.ws.embedded_suite),
                        ctx.params.register_.max_items_per_set, ctx.params.seed)


def _encoder(name: str, checkpoint, device):
    import open_clip

    from mmkd.models.encoder import ClipEncoder
    from mmkd.models.factory import load_checkpoint

    model, meta = load_checkpoint(checkpoint, device)  # safetensors weights: nothing is unpickled
    return ClipEncoder(name, model, open_clip.get_tokenizer(meta["model"]), device)


def _champion_encoder(tracking_uri: str, model_name: str, version: str, device):
    """The champion as an encoder, from its checkpoint downloaded from the registry (the download is removed once
    the weights are loaded); ChampionUnscorable when the version holds no mmkd student (registered by hand,
    artifacts gone)."""
    from mlflow.exceptions import MlflowException

    from mmkd.tracking.gate import ChampionUnscorable
    from mmkd.tracking.pyfunc import checkpoint_dir

    try:
        with checkpoint_dir(f"models:/{model_name}/{version}", tracking_uri) as folder:
            return _encoder("champion", folder, device)
    except (FileNotFoundError, ValueError) as e:
        raise ChampionUnscorable(str(e)) from e
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ChampionUnscorable(e.message) from e
        raise  # the registry unreachable: the step fails (and is retried), it does not promote


def step_register(ctx: Context, run: StepRun) -> dict:
    from mmkd.evaluation.selection import METRIC
    from mmkd.steps.evaluate import _cache_dir, _file_sha
    from mmkd.tracking.gate import DATA_TAG, register_student
    from mmkd.tracking.mlflow_runs import data_hash

    p, ws = ctx.params, ctx.ws
    cfg = p.register_
    run.log_params({"register": cfg.model_dump()})
    tracker = ctx.tracker()
    device, batch = _device(ctx), p.evaluate.batch_size
    t0 = time.perf_counter()
    # scored before anything is registered: a suite that cannot be read fails the step with no version created
    selection = _selection(ctx)
    # the student as evaluate named and versioned it: the val images it embedded there are not encoded again
    challenger = selection.outcomes(_encoder("student", ws.student, device), batch, _cache_dir(ctx),
                                    _file_sha(ws.student / "model.safetensors"))
    score = selection.score(challenger)
    compared: dict = {}

    def compare(champion_version: str) -> dict:
        t1 = time.perf_counter()
        champion = selection.outcomes(_champion_encoder(tracker.uri, cfg.model_name, champion_version, device), batch)
        compared.update(selection.compare(challenger, champion, p.seed, cfg.margin),
                        champion_seconds=round(time.perf_counter() - t1, 3))
        return compared

    metrics = json.loads(ws.metrics.read_text()) if ws.metrics.exists() else {}
    # the evaluation the version is reported on (its test-split metrics: the model's metadata, not the gate's)
    evaluation = (json.loads(ws.evaluation_report.read_text()).get("evaluation_id")
                  if ws.evaluation_report.exists() else None)
    decision = register_student(
        tracker.uri, run.run_id, ws.student, cfg.model_name, score, METRIC, compare, cfg.margin,
        cfg.challenger_alias, cfg.champion_alias,
        metadata={"profile": p.profile, "mean_metrics": metrics.get("student", {}).get("mean")},
        evaluation=evaluation, serving=p.serving.model_dump(),  # the limits the served model enforces
        pipeline_run=ctx.parent_run_id, n_items=selection.n)  # a retried register step reuses its version
    # the data the version was trained on (data.dvc's hash): the dashboard's history of champions shows it
    data_version = data_hash(ws.root, ws.raw_manifest)
    tracker.client.set_model_version_tag(cfg.model_name, decision.version, DATA_TAG, data_version)
    selection_record = {"metric": METRIC, "datasets": [s.name for s in selection.sets], "n_items": selection.n,
                        "challenger_per_set": selection.per_set(challenger),
                        "seconds": round(time.perf_counter() - t0, 3),
                        **{k: compared[k] for k in ("per_set", "resamples", "champion_seconds") if k in compared}}
    d = {**decision.as_dict(), "data_version": data_version, "selection": selection_record}
    gate_metrics = {"challenger_score": decision.challenger_score, "champion_score": decision.champion_score,
                    "difference": decision.difference, "ci_low": decision.ci_low, "ci_high": decision.ci_high,
                    "margin": decision.margin, "n_items": float(decision.n_items),
                    "promoted": float(decision.promoted), "seconds": selection_record["seconds"]}
    run.log_metrics({"gate": gate_metrics})
    run.set_tags({"mmkd.gate.decision": "promoted" if decision.promoted else "held", "mmkd.gate.reason": decision.reason,
                  "mmkd.gate.metric": decision.metric, "mmkd.model_version": decision.version,
                  "mmkd.champion_version": decision.champion_version, "mmkd.data_version": data_version})
    out = {**d, "run_id": run.run_id, "tracking_uri": tracker.uri,
           "model_uri": f"models:/{cfg.model_name}/{decision.version}",
           "champion_uri": f"models:/{cfg.model_name}@{cfg.champion_alias}"}
    ws.registration.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(ws.registration, out, sort_keys=True)
    return out
