"""Owns data validation: a Great Expectations 1.x suite over the curated manifest, with Data Docs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from mmkd.config import MODALITIES, ValidateCfg
from mmkd.data.curate import SPLITS
from mmkd.data.manifest import read_manifest


class ValidationFailed(RuntimeError):
    """One or more expectations failed; the message is a readable summary."""


def manifest_frame(curated_dir: Path) -> pd.DataFrame:
    rows = read_manifest(Path(curated_dir) / "manifest.jsonl")
    df = pd.DataFrame(rows)
    if df.empty:
        raise ValidationFailed(f"{curated_dir}: curated manifest is empty")
    df["caption"] = df["caption"].fillna("").astype(str)
    return df


def split_frame(df: pd.DataFrame, cfg: ValidateCfg) -> pd.DataFrame:
    counts = df["split"].value_counts()
    return pd.DataFrame([{"split": s, "rows": int(counts.get(s, 0)), "min_rows": int(cfg.min_split_rows.get(s, 1))}
                         for s in SPLITS])


def _expectations(gx, image_size: int, cfg: ValidateCfg):
    E = gx.expectations
    manifest = [
        E.ExpectColumnValuesToNotBeNull(column="id"),
        E.ExpectColumnValuesToBeUnique(column="id"),
        E.ExpectColumnValuesToBeUnique(column="sha256"),
        E.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=cfg.min_caption_chars),
        E.ExpectColumnValuesToBeInSet(column="modality", value_set=list(MODALITIES)),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=image_size, max_value=image_size),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=image_size, max_value=image_size),
    ]
    splits = [E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="rows", column_B="min_rows", or_equal=True)]
    return manifest, splits


def validate(curated_dir: Path, image_size: int, cfg: ValidateCfg, docs_dir: Path, report_path: Path) -> dict:
    """Run the suite, build Data Docs under docs_dir, write a JSON summary; raise on failure if configured."""
    import great_expectations as gx  # slow import (~7 s): only here

    df = manifest_frame(curated_dir)
    splits = split_frame(df, cfg)
    docs_dir = Path(docs_dir).resolve()
    project = Path(tempfile.mkdtemp(prefix="mmkd-gx-"))
    try:
        context = gx.get_context(mode="file", project_root_dir=str(project))
        context.add_data_docs_site("mmkd_site", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        })
        source = context.data_sources.add_pandas("mmkd")
        results = []
        for name, frame, exps in zip(("curated_manifest", "split_sizes"), (df, splits), _expectations(gx, image_size, cfg)):
            asset = source.add_dataframe_asset(name=name)
            batch_def = asset.add_batch_definition_whole_dataframe(f"{name}_all")
            suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
            for e in exps:
                suite.add_expectation(e)
            vdef = context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch_def, suite=suite))
            checkpoint = context.checkpoints.add(gx.Checkpoint(
                name=f"{name}_checkpoint", validation_definitions=[vdef],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["mmkd_site"])]))
            result = checkpoint.run(batch_parameters={"dataframe": frame})
            for run in result.run_results.values():
                results.extend(run.results)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    failures = []
    for r in results:
        cfg_ = r.expectation_config
        if not r.success:
            res = r.result or {}
            failures.append({"expectation": cfg_.type, "column": cfg_.kwargs.get("column") or
                             f"{cfg_.kwargs.get('column_A')}>={cfg_.kwargs.get('column_B')}",
                             "unexpected_count": res.get("unexpected_count"),
                             "examples": [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]]})
    summary = {"success": not failures, "evaluated": len(results), "failed": len(failures), "failures": failures,
               "rows": int(len(df)), "split_rows": dict(zip(splits["split"], splits["rows"].astype(int).tolist())),
               # relative to the report, so the report is the same on every machine
               "data_docs": os.path.relpath(docs_dir / "index.html", Path(report_path).resolve().parent)}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(summary, indent=1))
    if failures and cfg.fail_on_error:
        lines = [f"  - {f['expectation']} on {f['column']}: {f['unexpected_count']} unexpected, e.g. {f['examples']}"
                 for f in failures]
        raise ValidationFailed(f"{len(failures)} of {len(results)} expectations failed:\n" + "\n".join(lines)
                               + f"\nData Docs: {docs_dir / 'index.html'}")
    return summary
