"""The `inbox` flow: new image-caption drops -> data/ and data.dvc -> the retrain flow, recorded with the data version."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.retrain import retrain
from mmkd.data.inbox import InboxError, pending_drops
from mmkd.data.sources import source_root
from mmkd.steps import Context
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
    if not ready:
        logger.info("inbox %s: no new drop", inbox_dir)
        return {"drops": [], "refused": {}, "retrained": False}
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
        except InboxError as exc:  # left in the inbox, reported; the other drops go on
            logger.error("inbox: %s", exc)
            refused[folder.name] = str(exc)
            continue
        drops.append(ingest(drop_plan, str(manifest), str(inbox_dir / p.inbox.processed),
                            source.columns.get("image", "image")))
    new = [d for d in drops if not d["already_ingested"]]
    for d in drops:
        logger.info("inbox: %s -> %s (%d rows%s)", d["name"], d["drop_id"], d["rows"],
                    ", already ingested" if d["already_ingested"] else "")
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
