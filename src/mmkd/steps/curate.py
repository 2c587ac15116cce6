"""Owns the `curate` step: every configured source -> the curated store, quarantine and summary."""

from __future__ import annotations

import json
import logging
import shutil

from mmkd.steps.common import Context, StepRun

log = logging.getLogger("mmkd")


def step_curate(ctx: Context, run: StepRun) -> dict:
    from mmkd.data.curate import curate

    p, ws = ctx.params, ctx.ws
    run.log_params({"curate": p.curate.model_dump()})
    # no wipe: curation is incremental, it reuses what an earlier run with the same store settings wrote
    summary = curate(ws.data, ws.curated, p.curate)
    tasks = ws.data / "tasks.json"
    if tasks.exists():
        shutil.copy(tasks, ws.curated / "tasks.json")
    else:
        log.warning("curate: %s missing: no zero-shot/probe task definitions for evaluation", tasks)
        (ws.curated / "tasks.json").write_text("{}")
    run.log_metrics({k: summary[k] for k in ("input_records", "kept", "quarantined", "decoded", "reused", "shards",
                                             "unknown_modality")}
                    | {f"kept_{k}": v for k, v in summary["kept_per_split"].items()}
                    | {f"scrubbed_{k}": v for k, v in summary["scrubbed_identifiers"].items()}
                    | {f"quarantined_{k.replace(' ', '_')}": v for k, v in summary["quarantine_reasons"].items()})
    run.log_artifact(ws.curated / "quarantine.jsonl")
    run.log_artifact(ws.curated / "summary.json")
    if summary["quarantined"]:
        log.warning("curate: %d records quarantined (%s); see %s", summary["quarantined"],
                    json.dumps(summary["quarantine_reasons"]), ws.curated / "quarantine.jsonl")
    return summary
