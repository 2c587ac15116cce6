"""Owns validation's contamination gate: the curate step's contamination.json against validate's thresholds."""

from __future__ import annotations

import logging
from pathlib import Path

from mmkd.config import ValidateCfg
from mmkd.data import checksums
from mmkd.data.contamination import REPORT, load_report, summarise

log = logging.getLogger("mmkd")


def contamination_failures(curated_dir: Path, cfg: ValidateCfg) -> tuple[dict, list[dict], int]:
    """(summary for validation.json, failures in the suite's failure format, checks evaluated).

    Fails when a dataset's share of images with an exact (near) copy in the curated train split exceeds
    max_contaminated_fraction (max_near_duplicate_fraction), naming the images and records, or when the report
    was written for another store. A store without a report (curated by the library, not the curate step, or
    with curate.check_contamination off) is reported as not checked."""
    report = load_report(curated_dir)
    if report is None:
        log.warning("validate: no %s in %s: evaluation images were not checked for contamination", REPORT, curated_dir)
        return {"checked": False, "reason": f"no {REPORT} in the store (curate.check_contamination off, or the "
                                            "store was not curated by the curate step)"}, [], 0
    failures = []
    manifest = ((checksums.load(curated_dir) or {}).get("manifest.jsonl") or {}).get("blake2b")
    if report["store"].get("manifest") != manifest:
        failures.append({"expectation": "contamination_report_matches_store", "column": REPORT, "unexpected_count": 1,
                         "examples": [f"written for manifest {report['store'].get('manifest')}, the store has "
                                      f"{manifest}: run the curate step again"]})
    for kind, limit in (("exact", cfg.max_contaminated_fraction), ("near", cfg.max_near_duplicate_fraction)):
        over = {name: d for name, d in report["datasets"].items() if d[f"{kind}_train_fraction"] > limit}
        if not over:
            continue
        hits = [o for o in report["overlaps"]
                if o["match"] == kind and o["curated_split"] == "train" and o["dataset"] in over]
        failures.append({
            "expectation": f"{kind}_train_overlap_at_most", "column": f"{kind}_train_fraction<={limit}",
            "unexpected_count": len(over),
            "examples": [f"{n}: {d[kind]['train']}/{d['images']} images ({d[f'{kind}_train_fraction']:.2%})"
                         for n, d in sorted(over.items())][:5]
            + [f"{o['dataset']}: {o['eval_image']} = curated '{o['curated_id']}'" for o in hits[:5]]})
    return {"checked": True, **summarise(report)}, failures, 3
