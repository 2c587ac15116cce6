"""Owns data validation: Great Expectations 1.x suites over the curated manifest (streamed in chunks:
mmkd.validation.chunks) and shards, with Data Docs, and the contamination gate (mmkd.validation.contamination)."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from mmkd.config import CurateCfg, ValidateCfg
from mmkd.data.clean import UNKNOWN
from mmkd.data.contract import Rule, manifest_rules
from mmkd.data.splits import SPLITS
from mmkd.data.manifest import read_manifest
from mmkd.validation.chunks import COUNTED, Tally, duplicates, finish, fold, iter_chunks, set_unexpected
from mmkd.validation.contamination import contamination_failures
from mmkd import atomic


class ValidationFailed(RuntimeError):
    """One or more expectations failed; the message is a readable summary."""


def manifest_frame(curated_dir: Path) -> pd.DataFrame:
    """The whole curated manifest as one frame (small stores, tests); `validate` streams it (mmkd.validation.chunks)."""
    rows = read_manifest(Path(curated_dir) / "manifest.jsonl")
    df = pd.DataFrame(rows)
    if df.empty:
        raise ValidationFailed(f"{curated_dir}: curated manifest is empty")
    df["caption"] = df["caption"].fillna("").astype(str)
    return df


def split_frame(tally: Tally, cfg: ValidateCfg) -> pd.DataFrame:
    return pd.DataFrame([{"split": s, "rows": int(tally.splits.get(s, 0)), "min_rows": int(cfg.min_split_rows.get(s, 1))}
                         for s in SPLITS])


def modality_frame(tally: Tally, cfg: ValidateCfg, expected: list[str]) -> pd.DataFrame:
    """Train rows per expected modality, and the share of `unknown` records (one row each)."""
    train = tally.train_modalities
    rows = [{"modality": m, "train_rows": int(train.get(m, 0)), "min_rows": cfg.min_rows_per_modality,
             "share": 0.0} for m in expected]
    rows.append({"modality": UNKNOWN, "train_rows": int(train.get(UNKNOWN, 0)), "min_rows": 0,
                 "share": tally.unknown / tally.rows})
    return pd.DataFrame(rows)


def shard_frame(curated_dir: Path, per_shard: Mapping[str, int]) -> pd.DataFrame:
    """Per shard file: its size, the samples its tar holds, the manifest rows and decoded rows pointing at it."""
    curated_dir = Path(curated_dir)
    rows = []
    for path in sorted((curated_dir / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            samples = len({m.name.split(".", 1)[0] for m in tar})
        # every decoded view of the shard must hold its rows: the smallest count over the sizes is checked
        views = sorted((curated_dir / "decoded").glob(f"*/{path.stem}.npy"))
        rows.append({"shard": path.stem, "bytes": path.stat().st_size, "tar_samples": samples,
                     "manifest_rows": int(per_shard.get(path.stem, 0)), "views": len(views),
                     "decoded_rows": min((len(np.load(v, mmap_mode="r")) for v in views), default=-1)})
    listed = set(per_shard) - {r["shard"] for r in rows}
    rows += [{"shard": s, "bytes": 0, "tar_samples": 0, "manifest_rows": int(per_shard[s]), "views": 0,
              "decoded_rows": -1}
             for s in sorted(listed)]  # a manifest pointing at a missing shard fails the equality below
    return pd.DataFrame(rows)


def _frame_expectations(gx, curate: CurateCfg, cfg: ValidateCfg, max_size: int):
    """The suites of the small frames (splits, modalities, shards), after the manifest pass that sizes them."""
    E = gx.expectations
    splits = [E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="rows", column_B="min_rows", or_equal=True)]
    modalities = [E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="train_rows", column_B="min_rows", or_equal=True),
                  E.ExpectColumnValuesToBeBetween(column="share", min_value=0.0, max_value=cfg.max_unknown_fraction)]
    # a shard closes once it reaches the bound, so it may pass it by one record at most
    bound = curate.shard_max_bytes + max_size + 8192
    shards = [E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, max_value=bound),
              E.ExpectColumnPairValuesToBeEqual(column_A="tar_samples", column_B="manifest_rows")]
    if curate.decoded_sizes:
        n = len(curate.decoded_sizes)
        shards += [E.ExpectColumnPairValuesToBeEqual(column_A="decoded_rows", column_B="manifest_rows"),
                   E.ExpectColumnValuesToBeBetween(column="views", min_value=n, max_value=n)]
    return splits, modalities, shards


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
    from great_expectations.core.run_identifier import RunIdentifier

    docs_dir = Path(docs_dir).resolve()
    rules = manifest_rules(curate)
    path = Path(curated_dir) / "manifest.jsonl"
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
        # one run id: every chunk's result lands on the same stored key, which the aggregate then replaces, so
        # Data Docs hold one validation page per frame
        run_id = RunIdentifier(run_name="mmkd-validate")
        # the per-row rules are curation's contract (mmkd.data.contract): every kept record was checked against them
        manifest = _definition(gx, context, source, "curated_manifest", [_expectation(gx.expectations, r) for r in rules])
        tally = Tally([r.column for r in rules if r.kind == "unique"])
        acc, chunks = None, 0
        for chunk in iter_chunks(path, cfg.chunk_rows, sorted({r.column for r in rules} | set(COUNTED))):
            tally.add(chunk)
            res = manifest.run(batch_parameters={"dataframe": chunk}, run_id=run_id)
            if acc is None:
                acc = res
            else:
                fold(acc, res)
            chunks += 1
        if acc is None:
            raise ValidationFailed(f"{curated_dir}: curated manifest is empty")
        if chunks > 1:  # a chunk sees only its own duplicates: the unique rules are counted over the whole manifest
            dups = duplicates(path, cfg.chunk_rows, tally.repeated())
            for r in acc.results:
                if r.expectation_config.type == "expect_column_values_to_be_unique":
                    d = dups.get(r.expectation_config.kwargs["column"]) or {"count": 0, "values": [], "rows": []}
                    set_unexpected(r, d["count"], d["values"], d["rows"])
            finish(acc)
        _store(context, acc, run_id)
        results = list(acc.results)
        splits = split_frame(tally, cfg)
        frames = {"split_sizes": splits,
                  "modality_coverage": modality_frame(tally, cfg, cfg.expected_modalities or expected_modalities),
                  "shards": shard_frame(curated_dir, tally.shards)}
        for (name, frame), exps in zip(frames.items(), _frame_expectations(gx, curate, cfg, tally.max_size)):
            results.extend(_definition(gx, context, source, name, exps).run(
                batch_parameters={"dataframe": frame}, run_id=run_id).results)
        context.build_data_docs(site_names=["mmkd_site"])
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
               "rows": tally.rows, "split_rows": dict(zip(splits["split"], splits["rows"].astype(int).tolist())),
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


def _definition(gx, context, source, name: str, expectations: list):
    """A dataframe asset, its suite and the validation definition that runs one (whole or chunk) frame through it."""
    batch_def = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(f"{name}_all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for e in expectations:
        suite.add_expectation(e)
    return context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch_def,
                                                                      suite=suite))


def _store(context, result, run_id) -> None:
    """Store the folded manifest result over the last chunk's, under that chunk's key (same suite, batch, run)."""
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    store = context.validation_results_store
    [key] = [k for k in store.list_keys() if k.expectation_suite_identifier.name == result.suite_name
             and k.run_id == run_id]
    store.store_validation_results(result, key, ExpectationSuiteIdentifier(name=result.suite_name))
