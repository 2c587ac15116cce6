"""The `inbox` flow: new image-caption drops -> data/ and data.dvc -> the retrain flow, recorded with the data version.

With a drop waiting, the flow holds the workspace lock from ingestion to the end of the retrain (a subflow in this
process: it re-enters the lock); `dvc add` runs under it as a child process. An empty inbox takes no lock.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.retrain import retrain
from mmkd.data.inbox import InboxError, pending_drops
from mmkd.data.sources import source_root
from mmkd.steps import Context, hold_workspace
from tasks.inbox import ingest, plan, version_data


@flow(name="inbox", log_prints=True)
def inbox(profile: str | None = None, root: str = ".", params_path: str | None = None,
          retrain_after: bool = True) -> dict:
    """Ingest every complete drop, then retrain once (curation, features and evaluation are incremental, so
    only the new pairs are decoded and sent through the teachers); the gate decides the promotion."""
    logger = get_run_logger()
    ctx = Context.load(root, params_path, profile)
    p, ws = ctx.params, ctx.ws
    inbox_dir = ws.root / p.inbox.dir
    ready, waiting = pending_drops(inbox_dir, p.inbox.processed)
    for folder in waiting:
        logger.info("inbox: %s has no manifest.jsonl or manifest.csv yet; it waits", folder.name)
    if not ready:  # nothing to write: no lock taken, a running retrain is not disturbed
        logger.info("inbox %s: no new drop", inbox_dir)
        return {"drops": [], "refused": {}, "retrained": False}
    with hold_workspace(ctx, "flow inbox"):  # ingestion, data.dvc and the retrain: one writer per workspace
        return _ingest_and_retrain(ctx, logger, inbox_dir, retrain_after)


def _ingest_and_retrain(ctx: Context, logger, inbox_dir, retrain_after: bool) -> dict:
    p, ws = ctx.params, ctx.ws
    ready, _ = pending_drops(inbox_dir, p.inbox.processed)  # again, under the lock: another run may have taken some
    source = next((s for s in p.curate.sources if s.name == p.inbox.source), None)
    if source is None:
        raise ValueError(f"inbox.source '{p.inbox.source}' is not one of curate.sources "
                         f"{[s.name for s in p.curate.sources]}; add {{name: {p.inbox.source}, kind: manifest, "
                         f"path: inbox/manifest.jsonl, optional: true}}")
    manifest = source_root(source, ws.data)
    drops, refused = [], {}
    for folder in ready:
        try:
            drop_plan = plan(str(folder))
            drops.append(ingest(drop_plan, str(manifest), str(inbox_dir / p.inbox.processed),
                                source.columns.get("image", "image")))
        except InboxError as exc:  # a link, no manifest, changed while copied: left in the inbox, reported
            logger.error("inbox: %s", exc)
            refused[folder.name] = str(exc)
    # a drop whose rows an interrupted run had written (`recovered`) is new to the data version and the models
    new = [d for d in drops if not d["already_ingested"]]
    for d in drops:
        logger.info("inbox: %s -> %s (%d rows%s)", d["name"], d["drop_id"], d["rows"],
                    ", already ingested" if d["already_ingested"] else
                    ", completed after an interrupted run" if d.get("recovered") else "")
    if not new:
        return {"drops": drops, "refused": refused, "retrained": False}
    version = version_data(str(ws.root), str(ws.data))
    logger.info("data version %s (%s)", version["data_version"], "data.dvc" if version["dvc"] else "manifest hash")
    if not retrain_after:
        return {"drops": drops, "refused": refused, "retrained": False, "data_version": version["data_version"]}
    result = retrain(profile=p.profile, root=str(ws.root), params_path=str(ctx.params_path), trigger="inbox",
                     note="drops: " + ", ".join(d["drop_id"] for d in new))
    return {"drops": drops, "refused": refused, "retrained": True, "data_version": version["data_version"],
            "retrain": result}
