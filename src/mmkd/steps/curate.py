"""Owns the `curate` step: every configured source -> the curated store, quarantine and summary."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from mmkd.data.deid import deidentified_quarantine
from mmkd.data.generation import Generations
from mmkd.data.splits import KEY_ID_FILE, key_id, keyed_token, rekey_needed, workspace_key
from mmkd.steps.common import Context, StepRun

log = logging.getLogger("mmkd")


def step_curate(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.curate import curate

    p, ws = ctx.params, ctx.ws
    run.log_params({"curate": p.curate.model_dump()})
    tasks = ws.data / "tasks.json"
    if not tasks.exists():
        log.warning("curate: %s missing: no zero-shot/probe task definitions for evaluation", tasks)
    # no wipe: curation is incremental, it reuses what an earlier run with the same store settings wrote; the
    # task definitions go into the same store generation, so they are switched in with it
    extra = {"tasks.json": tasks.read_bytes() if tasks.exists() else b"{}"}
    # group tokens are keyed with the workspace secret (the splits are not); a store under another key is rebuilt
    key = workspace_key(ws.root)
    for what in Generations(ws.curated).recover():  # first: the key check must read the generation that stays
        log.info("curate: after an interrupted run: %s", what)
    cfg = p.curate.model_copy(update={"group_key": key} | ({"incremental": False} if rekey_needed(ws.curated, key)
                                                           else {}))
    extra[KEY_ID_FILE] = key_id(key).encode()
    if cfg.executor == "dask":  # decoding as work units on the cluster caching uses (features.dask)
        from mmkd.data.curate_dask import dask_client, decoder

        with dask_client(p.features.dask) as client:
            summary = curate(ws.data, ws.curated, cfg, extra=extra,
                             decode=decoder(client, cfg.partition_records, cfg.workers))
    else:
        summary = curate(ws.data, ws.curated, cfg, extra=extra)
    run.log_metrics({k: summary[k] for k in ("input_records", "kept", "quarantined", "decoded", "reused", "shards",
                                             "unknown_modality")}
                    | {f"kept_{k}": v for k, v in summary["kept_per_split"].items()}
                    | {f"scrubbed_{k}": v for k, v in summary["scrubbed_identifiers"].items()}
                    | {f"quarantined_{k.replace(' ', '_')}": v for k, v in summary["quarantine_reasons"].items()})
    # MLflow is readable by every user in team mode: it gets a de-identified copy; the full file stays local
    with tempfile.TemporaryDirectory(prefix="mmkd-quarantine-") as tmp:
        run.log_artifact(deidentified_quarantine(ws.curated / "quarantine.jsonl", Path(tmp) / "quarantine.jsonl",
                                                 keyed_token(key)))
    run.log_artifact(ws.curated / "summary.json")
    if p.curate.check_contamination:
        _check_contamination(ctx, run)
    if summary["quarantined"]:
        log.warning("curate: %d records quarantined (%s); see %s", summary["quarantined"],
                    json.dumps(summary["quarantine_reasons"]), ws.curated / "quarantine.jsonl")
    return summary


def _check_contamination(ctx: Context, run: StepRun) -> None:
    """Every evaluation image on disk against the store just switched in: artifacts/curated/contamination.json
    (validation fails above validate.max_contaminated_fraction). Written after the switch, beside the store's
    files (not in checksums.json): the next curation run replaces the generation, and this step rewrites it."""
    from mmkd.data.contamination import summarise, workspace_report, write_report

    report = workspace_report(ctx.params, ctx.ws)
    write_report(ctx.ws.curated, report)
    short = summarise(report)
    run.log_metrics({f"contamination_{kind}_{split}": n for kind, per in short["totals"].items()
                     for split, n in per.items()} | {"contamination_images": report["images"]})
    # counts only: the report names curated record ids, which may carry identifiers (the quarantine's rule)
    if short["contaminated_datasets"]:
        log.warning("curate: evaluation images found in the curated train split: %s; e.g. %s (see %s)",
                    json.dumps(short["contaminated_datasets"]), "; ".join(short["examples"][:3]),
                    ctx.ws.curated / "contamination.json")
