"""Owns step reuse inside flows: a step whose inputs, parameters and code are unchanged since it last succeeded is
not run again, decided by a content fingerprint as DVC decides its stages.

Each step declares what it reads (workspace paths, params keys) and writes, as its dvc.yaml stage does
(tests/test_step_reuse.py holds the two together). After a step succeeds, `.mmkd/steps/<step>.json` records the
fingerprint of its inputs and the digest of its outputs. A flow skips the step when both still match, so outputs
changed or deleted since (`dvc checkout`, a hand edit) make it run. The code is the whole library: any code change
re-runs every step. The record is removed before a step runs, and written after it succeeded, so a killed step
is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mmkd import atomic
from mmkd.steps.common import Context
from mmkd.steps.fingerprint import HashCache, code_digest, tree_digest

log = logging.getLogger("mmkd")
RECORDS = Path(".mmkd") / "steps"
HASHES = Path(".mmkd") / "hashes.sqlite"


class StaleReuse(RuntimeError):
    """What a step's outputs were checked against has changed in a way the fingerprint does not cover: run it."""


@dataclass(frozen=True)
class StepIO:
    """What a step reads and writes. inputs/outputs: workspace paths from the Context; params: dotted keys of
    params.yaml (resolved, after the profile's overlay). still_valid: a check a skipped step's outputs must pass
    (it raises with the reason when they do not; StaleReuse makes the step run instead)."""

    inputs: Callable[[Context], list[Path]]
    params: tuple[str, ...]
    outputs: Callable[[Context], list[Path]]
    still_valid: Callable[[Context, dict], None] | None = None
    notes: dict = field(default_factory=dict)


def _curate_inputs(ctx: Context) -> list[Path]:
    """data/ and every source outside it (an absolute path in curate.sources)."""
    from mmkd.data.sources import source_root

    roots = [ctx.ws.data]
    for src in ctx.params.curate.sources:
        root = source_root(src, ctx.ws.data)
        if not root.resolve().is_relative_to(ctx.ws.data.resolve()):
            roots.append(root)
    return roots


def _teachers_inputs(ctx: Context) -> list[Path]:
    # embedded teachers on their own synthetic corpora read nothing of the workspace; only the disjointness check
    # reads the curated keys, and a skipped step repeats it (_teachers_still_valid)
    return [ctx.ws.curated] if ctx.params.teachers.corpus.source == "curated" else []


def _teachers_still_valid(ctx: Context, record: dict) -> None:
    from mmkd.steps.teachers import check_corpora_against_curated

    check_corpora_against_curated(ctx)


def _register_still_valid(ctx: Context, record: dict) -> None:
    """The version the skipped step registered must still be in the registry it was registered in."""
    reg = json.loads(ctx.ws.registration.read_text())
    tracker = ctx.tracker()
    if reg.get("tracking_uri") != tracker.uri:
        raise StaleReuse(f"registered in {reg.get('tracking_uri')}, tracking now {tracker.uri}")
    try:
        tracker.client.get_model_version(reg["model_name"], reg["version"])
    except Exception as exc:  # noqa: BLE001 - a missing version or model: register again
        raise StaleReuse(f"{reg['model_name']} v{reg['version']} is not in the registry: {exc}") from exc


STEP_IO: dict[str, StepIO] = {
    "curate": StepIO(_curate_inputs, ("paths", "curate"), lambda c: [c.ws.curated]),
    "validate": StepIO(lambda c: [c.ws.curated], ("paths", "validate", "curate", "synth.modalities"),
                       lambda c: [c.ws.validation_report, c.ws.reports / "data_docs"]),
    "teachers": StepIO(_teachers_inputs, ("paths", "seed", "device", "threads", "teachers", "synth"),
                       lambda c: [c.ws.teachers], _teachers_still_valid,
                       notes={"dvc_only_inputs": ("artifacts/curated", "reports/validation.json")}),
    "cache_features": StepIO(lambda c: [c.ws.curated, c.ws.teachers],
                             ("paths", "seed", "device", "features", "teachers.registry"),
                             lambda c: [c.ws.teacher_features]),
    "align": StepIO(lambda c: [c.ws.curated, c.ws.teacher_features, c.ws.stage1],
                    ("paths", "seed", "device", "align", "features.dtype", "teachers.registry", "pretrain.model"),
                    lambda c: [c.ws.aligned_features]),
    "pretrain": StepIO(lambda c: [c.ws.curated, c.ws.validation_report],
                       ("paths", "seed", "device", "threads", "pretrain"), lambda c: [c.ws.stage1]),
    "distill": StepIO(lambda c: [c.ws.stage1, c.ws.aligned_features, c.ws.teacher_features, c.ws.curated],
                      ("paths", "seed", "device", "threads", "distill", "teachers.registry"),
                      lambda c: [c.ws.student]),
    "evaluate": StepIO(lambda c: [c.ws.student, c.ws.stage1, c.ws.teachers, c.ws.eval_data, c.ws.embedded_suite],
                       ("paths", "seed", "device", "evaluate", "synth.eval_suite", "teachers.registry"),
                       lambda c: [c.ws.metrics, c.ws.leaderboard, c.ws.evaluation_report, c.ws.plots]),
    "register": StepIO(lambda c: [c.ws.student, c.ws.metrics, c.ws.evaluation_report, c.ws.eval_data,
                                  c.ws.embedded_suite],  # the gate's val items
                       ("paths", "seed", "device", "evaluate", "register", "serving", "tracking"),
                       lambda c: [c.ws.registration],
                       _register_still_valid),
}


def _param(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


def _rel(ctx: Context, path: Path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ctx.ws.root).as_posix() if path.is_relative_to(ctx.ws.root) else str(path)


def fingerprint(ctx: Context, name: str, cache: HashCache) -> dict:
    """What decides whether step `name` must run: its inputs' contents, its params, the code, the device."""
    from mmkd.steps.common import _device

    io = STEP_IO[name]
    params = ctx.params.model_dump(by_alias=True, mode="json")
    parts = {
        "inputs": {_rel(ctx, p): tree_digest(p, cache) for p in io.inputs(ctx)},
        "params": {k: _param(params, k) for k in io.params},
        "code": code_digest(),
        "device": str(_device(ctx)),
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return {"id": hashlib.blake2b(blob, digest_size=16).hexdigest(), "inputs": parts["inputs"], "code": parts["code"]}


def fingerprint_now(ctx: Context, name: str) -> dict | None:
    """The step's fingerprint, None for a step that is never skipped (synth)."""
    if name not in STEP_IO:
        return None
    with HashCache(ctx.ws.root / HASHES) as cache:
        return fingerprint(ctx, name, cache)


def outputs_digest(ctx: Context, name: str, cache: HashCache) -> dict:
    return {_rel(ctx, p): tree_digest(p, cache) for p in STEP_IO[name].outputs(ctx)}


def record_path(ctx: Context, name: str) -> Path:
    return ctx.ws.root / RECORDS / f"{name}.json"


def forget(ctx: Context, name: str) -> None:
    """Before a step runs: no record claims its outputs while it writes them."""
    record_path(ctx, name).unlink(missing_ok=True)


def remember(ctx: Context, name: str, fp: dict, summary: dict, run_id: str | None) -> None:
    """After a step succeeded: its fingerprint, its outputs' digest and what it returned."""
    with HashCache(ctx.ws.root / HASHES) as cache:
        outputs = outputs_digest(ctx, name, cache)
    record = {"step": name, "fingerprint": fp["id"], "inputs": fp["inputs"], "code": fp["code"], "outputs": outputs,
              "summary": summary, "run_id": run_id, "finished": datetime.now(timezone.utc).isoformat()}
    path = record_path(ctx, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record, sort_keys=True, default=str)


def reusable(ctx: Context, name: str) -> tuple[dict, dict | None, str]:
    """(the step's fingerprint now, its record when the step can be skipped else None, why it must run)."""
    with HashCache(ctx.ws.root / HASHES) as cache:
        fp = fingerprint(ctx, name, cache)
        path = record_path(ctx, name)
        if not path.exists():
            return fp, None, "no record of a successful run"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return fp, None, f"unreadable record {path}: {exc}"
        if record.get("fingerprint") != fp["id"]:
            changed = sorted(k for k in set(fp["inputs"]) | set(record.get("inputs", {}))
                             if fp["inputs"].get(k) != record.get("inputs", {}).get(k))
            why = (f"inputs changed: {', '.join(changed)}" if changed else
                   "code changed" if record.get("code") != fp["code"] else "params or device changed")
            return fp, None, why
        outputs = outputs_digest(ctx, name, cache)
        if outputs != record.get("outputs"):
            changed = sorted(k for k in outputs if outputs[k] != record.get("outputs", {}).get(k))
            return fp, None, f"outputs changed since: {', '.join(changed)}"
    if STEP_IO[name].still_valid is not None:
        try:
            STEP_IO[name].still_valid(ctx, record)
        except StaleReuse as exc:
            return fp, None, str(exc)
    return fp, record, ""
