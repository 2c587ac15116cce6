"""Data tests: the Great Expectations suite over the curated manifest."""

import json

import pytest

from mmkd.config import MODALITIES, CurateCfg, ValidateCfg
from mmkd.validation.suite import ValidationFailed, validate


def test_suite_passes_on_curated_smoke_data(smoke_corpus, tmp_path):
    summary = validate(smoke_corpus / "artifacts" / "curated", CurateCfg(decoded_sizes=[48, 64]), ValidateCfg(), tmp_path / "docs",
                       tmp_path / "v.json", list(MODALITIES))
    assert summary["success"] and summary["failed"] == 0 and summary["evaluated"] >= 15
    assert (tmp_path / "docs" / "index.html").exists()
    assert json.loads((tmp_path / "v.json").read_text())["rows"] == summary["rows"]


def test_suite_failure_is_readable_and_keeps_the_report(smoke_corpus, tmp_path):
    cfg = ValidateCfg(min_split_rows={"train": 10_000, "probe": 1, "test": 1}, min_rows_per_modality=1000)
    with pytest.raises(ValidationFailed) as err:
        validate(smoke_corpus / "artifacts" / "curated", CurateCfg(max_side=32, decoded_sizes=[48, 64]), cfg, tmp_path / "docs",
                 tmp_path / "v.json", list(MODALITIES))
    msg = str(err.value)
    assert "expect_column_values_to_be_between on width" in msg
    assert "rows>=min_rows" in msg and "train_rows>=min_rows" in msg and "Data Docs" in msg
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["success"] is False and report["failed"] == 4


def test_suite_catches_an_empty_caption_that_slipped_through(smoke_corpus, tmp_path):
    import shutil

    cur = tmp_path / "curated"
    shutil.copytree(smoke_corpus / "artifacts" / "curated", cur)
    lines = (cur / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["caption"] = "x"
    lines[0] = json.dumps(rec)
    (cur / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationFailed, match="value_lengths_to_be_between on caption: 1 unexpected"):
        validate(cur, CurateCfg(decoded_sizes=[48, 64]), ValidateCfg(), tmp_path / "docs", tmp_path / "v.json", list(MODALITIES))


def test_suite_checks_the_shards_against_the_manifest(smoke_corpus, tmp_path):
    import shutil

    cur = tmp_path / "curated"
    shutil.copytree(smoke_corpus / "artifacts" / "curated", cur)
    lines = (cur / "manifest.jsonl").read_text().splitlines()
    (cur / "manifest.jsonl").write_text("\n".join(lines[1:]) + "\n")  # a shard now holds a sample no line lists
    with pytest.raises(ValidationFailed, match="tar_samples==manifest_rows: 1 unexpected"):
        validate(cur, CurateCfg(decoded_sizes=[48, 64]), ValidateCfg(), tmp_path / "docs", tmp_path / "v.json", list(MODALITIES))
