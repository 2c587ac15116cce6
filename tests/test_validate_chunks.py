"""Data tests: validation streams the manifest in chunks and still sees it whole (duplicates across chunks, late
bad rows, the same verdicts and counts as one frame, one Data Docs page per frame)."""

import json
import shutil

import pytest

from mmkd.config import MODALITIES, CurateCfg, ValidateCfg
from mmkd.data.contract import manifest_rules, violations
from mmkd.validation.suite import ValidationFailed, manifest_frame, validate

CURATE = CurateCfg(decoded_sizes=[48, 64])


def _store(smoke_corpus, tmp_path, edit, shard=None):
    """A copy of the smoke store whose manifest records went through edit(records) (in place); with shard, only
    that shard's files and records (a small store that is still consistent)."""
    cur = tmp_path / "curated"
    shutil.copytree(smoke_corpus / "artifacts" / "curated", cur)
    recs = [json.loads(line) for line in (cur / "manifest.jsonl").read_text().splitlines()]
    if shard:
        recs = [r for r in recs if r["shard"] == shard]
        for f in [*(cur / "shards").glob("*.tar"), *(cur / "decoded").glob("*/*.npy")]:
            if f.stem != shard:
                f.unlink()
    edit(recs)
    (cur / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return cur, recs


def _run(cur, tmp_path, chunk_rows, name="v", **kw):
    cfg = ValidateCfg(chunk_rows=chunk_rows, **kw)
    return validate(cur, CURATE, cfg, tmp_path / f"docs-{name}", tmp_path / f"{name}.json", list(MODALITIES))


def test_a_duplicate_id_in_two_chunks_is_caught_and_named(smoke_corpus, tmp_path):
    def edit(recs):
        recs[-1]["id"] = recs[0]["id"]  # first chunk and last chunk: no single chunk holds both copies
    cur, recs = _store(smoke_corpus, tmp_path, edit)
    assert len(recs) > 2 * 100
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_unique on id: 2 unexpected") as err:
        _run(cur, tmp_path, chunk_rows=100)
    assert recs[0]["id"] in str(err.value)
    [failure] = json.loads((tmp_path / "v.json").read_text())["failures"]
    assert failure["column"] == "id" and failure["examples"] == [recs[0]["id"]] * 2


def test_a_bad_row_in_the_last_chunk_is_caught(smoke_corpus, tmp_path):
    def edit(recs):
        recs[-1]["width"] = 10**6
    cur, recs = _store(smoke_corpus, tmp_path, edit)
    assert len(recs) > 3 * 100
    with pytest.raises(ValidationFailed, match=r"to_be_between on width: 1 unexpected, e.g. \['1000000'\]"):
        _run(cur, tmp_path, chunk_rows=100)


def test_chunked_and_whole_frame_validation_agree(smoke_corpus, tmp_path):
    def edit(recs):
        recs[1]["id"] = recs[9]["id"]          # a duplicate across chunks
        recs[4]["key"] = recs[5]["key"]        # ... within one chunk
        recs[7]["caption"] = "x"               # too short
        recs[-2]["height"] = 10**6             # late rows out of bounds
        recs[-4]["height"] = 0
        recs[-5]["modality"] = "sonar"         # not a modality
        del recs[12]["source"]                 # a record lacking a column: null there
    cur, recs = _store(smoke_corpus, tmp_path, edit, shard="probe-00000")  # ~50 rows: ~20 chunks of 3
    small = {"min_split_rows": {"train": 0, "probe": 1, "test": 0}, "min_rows_per_modality": 0, "fail_on_error": False}
    chunked = _run(cur, tmp_path, chunk_rows=3, name="chunked", **small)
    whole = _run(cur, tmp_path, chunk_rows=10**6, name="whole", **small)  # one batch: GX sees the whole frame
    for key in ("success", "evaluated", "failed", "failures", "rows", "split_rows"):
        assert chunked[key] == whole[key], key
    assert chunked["rows"] == len(recs) and chunked["failed"] == 6
    # and both match the contract's pandas evaluation of the whole frame, counts and examples
    expected = violations(manifest_frame(cur), manifest_rules(CURATE))
    got = [(f["unexpected_count"], f["examples"]) for f in chunked["failures"]]
    assert got == [(v["unexpected_count"], v["examples"]) for v in expected]
    # Data Docs: one validation page per frame, not one per chunk
    pages = sorted(p.parent.parent.parent.name for p in (tmp_path / "docs-chunked" / "validations").rglob("*.html"))
    assert pages == ["curated_manifest_suite", "modality_coverage_suite", "shards_suite", "split_sizes_suite"]
