"""Owns data validation: Great Expectations 1.x suites over the curated manifest and shards, with Data Docs,
and the contamination gate (mmkd.validation.contamination)."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mmkd.config import CurateCfg, ValidateCfg
from mmkd.data.clean import UNKNOWN
from mmkd.data.contract import Rule, manifest_rules
from mmkd.data.splits import SPLITS
from mmkd.data.manifest import read_manifest
from mmkd.validation.contamination import contamination_failures
from mmkd import atomic


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


def modality_frame(df: pd.DataFrame, cfg: ValidateCfg, expected: list[str]) -> pd.DataFrame:
    """Train rows per expected modality, and the share of `unknown` records (one row each)."""
    train = df[df["split"] == "train"]["modality"].value_counts()
    unknown = float((df["modality"] == UNKNOWN).mean())
    rows = [{"modality": m, "train_rows": int(train.get(m, 0)), "min_rows": cfg.min_rows_per_modality,
             "share": 0.0} for m in expected]
    rows.append({"modality": UNKNOWN, "train_rows": int(train.get(UNKNOWN, 0)), "min_rows": 0, "share": unknown})
    return pd.DataFrame(rows)


def shard_frame(curated_dir: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Per shard file: its size, the samples its tar holds, the manifest rows and decoded rows pointing at it."""
    curated_dir = Path(curated_dir)
    per_shard = df["shard"].value_counts()
    rows = []
    for path in sorted((curated_dir / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            samples = len({m.name.split(".", 1)[0] for m in tar})
        # every decoded view of the shard must hold its rows: the smallest count over the sizes is checked
        views = sorted((curated_dir / "decoded").glob(f"*/{path.stem}.npy"))
        rows.append({"shard": path.stem, "bytes": path.stat().st_size, "tar_samples": samples,
                     "manifest_rows": int(per_shard.get(path.stem, 0)), "views": len(views),
                     "decoded_rows": min((len(np.load(v, mmap_mode="r")) for v in views), default=-1)})
    listed = set(per_shard.index) - {r["shard"] for r in rows}
    rows += [{"shard": s, "bytes": 0, "tar_samples": 0, "manifest_rows": int(per_shard[s]), "views": 0,
              "decoded_rows": -1}
             for s in sorted(listed)]  # a manifest pointing at a missing shard fails the equality below
    return pd.DataFrame(rows)


def _expectations(gx, curate: CurateCfg, cfg: ValidateCfg, df: pd.DataFrame):
    E = gx.expectations
    # the per-row rules are curation's contract (mmkd.data.contract): every kept record was checked against them
    manifest = [_expectation(E, r) for r in manifest_rules(curate)]
    splits = [E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="rows", column_B="min_rows", or_equal=True)]
    modalities = [E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="train_rows", column_B="min_rows", or_equal=True),
                  E.ExpectColumnValuesToBeBetween(column="share", min_value=0.0, max_value=cfg.max_unknown_fraction)]
    # a shard closes once it reaches the bound, so it may pass it by one record at most
    bound = curate.shard_max_bytes + int(df["size"].max()) + 8192
    shards = [E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, max_value=bound),
              E.ExpectColumnPairValuesToBeEqual(column_A="tar_samples", column_B="manifest_rows")]
    if curate.decoded_sizes:
        n = len(curate.decoded_sizes)
        shards += [E.ExpectColumnPairValuesToBeEqual(column_A="decoded_rows", column_B="manifest_rows"),
                   E.ExpectColumnValuesToBeBetween(column="views", min_value=n, max_value=n)]
    return manifest, splits, modalities, shards


def _expectation(E, rule: Rule):
    if rule.kind == "not_null":
        return E.ExpectColumnValuesToNotBeNull(column=rule.column)
    if rule.kind == "unique":
        return E.ExpectColumnValuesToBeUnique(column=rule.column)
    if rule.kind == "length":
        return E.ExpectColumnValueLengthsToBeBetween(column=rule.column, min_value=rule.lo, max_value=rule.hi)
    if rule.kind == "between":
        return E.ExpectColumnValuesToBeBetween(column=rule.column, min_value=rule.lo, max_value=rule.hi)
    return E.ExpectColumnValuesToBeInSet(column=rule.column, value_set=list(rule.values))


def validate(curated_dir: Path, curate: CurateCfg, cfg: ValidateCfg, docs_dir: Path, report_path: Path,
             expected_modalities: list[str]) -> dict:
    """Run the suite, build Data Docs under docs_dir, write a JSON summary; raise on failure if configured."""
    import great_expectations as gx  # slow import (~7 s): only here

    df = manifest_frame(curated_dir)
    splits = split_frame(df, cfg)
    frames = {"curated_manifest": df, "split_sizes": splits,
              "modality_coverage": modality_frame(df, cfg, cfg.expected_modalities or expected_modalities),
              "shards": shard_frame(curated_dir, df)}
    docs_dir = Path(docs_dir).resolve()
    project = Path(tempfile.mkdtemp(prefix="mmkd-gx-"))
    try:
        context = gx.get_context(mode="file", project_root_dir=str(project))
        if not sys.stderr.isatty():  # off a terminal GX's bars are carriage-return noise in the log
            from great_expectations.data_context.types.base import ProgressBarsConfig

            context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.add_data_docs_site("mmkd_site", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        })
        source = context.data_sources.add_pandas("mmkd")
        results = []
        for (name, frame), exps in zip(frames.items(), _expectations(gx, curate, cfg, df)):
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
    contamination, failures, n_checks = contamination_failures(curated_dir, cfg)
    for r in results:
        cfg_ = r.expectation_config
        if not r.success:
            res = r.result or {}
            op = "==" if cfg_.type.endswith("to_be_equal") else ">="
            failures.append({"expectation": cfg_.type, "column": cfg_.kwargs.get("column") or
                             f"{cfg_.kwargs.get('column_A')}{op}{cfg_.kwargs.get('column_B')}",
                             "unexpected_count": res.get("unexpected_count"),
                             "examples": [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]]})
    summary = {"success": not failures, "evaluated": len(results) + n_checks, "failed": len(failures),
               "failures": failures, "contamination": contamination,
               "rows": int(len(df)), "split_rows": dict(zip(splits["split"], splits["rows"].astype(int).tolist())),
               # relative to the report, so the report is the same on every machine
               "data_docs": os.path.relpath(docs_dir / "index.html", Path(report_path).resolve().parent)}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(report_path, summary)
    if failures and cfg.fail_on_error:
        lines = [f"  - {f['expectation']} on {f['column']}: {f['unexpected_count']} unexpected, e.g. {f['examples']}"
                 for f in failures]
        raise ValidationFailed(f"{len(failures)} of {summary['evaluated']} expectations failed:\n" + "\n".join(lines)
                               + f"\nData Docs: {docs_dir / 'index.html'}")
    return summary
