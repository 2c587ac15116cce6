"""The `evaluate` flow: score the current student and the teachers again (e.g. after adding a dataset)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from mmkd.steps import Context, finish_pipeline, hold_workspace, start_pipeline
from tasks.evaluate import evaluate as evaluate_step


@flow(name="evaluate", log_prints=True)
def evaluate(profile: str | None = None, root: str = ".", params_path: str | None = None) -> dict:
    """The evaluate step on what the workspace holds, under a parent run of its own; registers nothing."""
    logger = get_run_logger()
    ctx = Context.load(root, params_path, profile)
    with hold_workspace(ctx, "flow evaluate"):  # it writes reports/ and the evaluation cache: one writer at a time
        t0 = time.perf_counter()
        parent = start_pipeline(ctx, entry="prefect", tags={"mmkd.trigger": "evaluate"}, name="evaluate")
        try:
            # asked for on demand: always scored again (unchanged units come from the embedding cache)
            result = evaluate_step(str(ctx.ws.root), str(ctx.params_path), ctx.params.profile, parent, force=True)
        except BaseException:
            finish_pipeline(ctx, parent, ok=False)
            raise
        seconds = time.perf_counter() - t0
        finish_pipeline(ctx, parent, ok=True, summary={"pipeline_seconds": seconds})
    logger.info("evaluated %s unit(s) in %.0f s; reports in %s", result["summary"]["units"], seconds, ctx.ws.reports)
    return {"parent_run_id": parent, "seconds": seconds, "evaluation": result["summary"]}
