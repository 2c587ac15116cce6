"""The contamination check: evaluation images planted in the training corpus are caught by the curate step and
fail validation; clean data gives no overlap; a second check reads the hash cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmkd.config import ValidateCfg
from mmkd.data.contamination import REPORT, cache_path, contamination_summary, workspace_report
from mmkd.evaluation.catalog import suite_entries
from mmkd.validation.contamination import contamination_failures
from tests.conftest import write_params


def _image(seed: int, size: int = 64) -> np.ndarray:
    """A distinct smooth random RGB image (upsampled noise: real structure at the pHash's frequencies)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def _workspace(root: Path) -> Path:
    """Params (smoke profile, one manifest source of 12 images: r0-r9 train, r10-r11 test) and an evaluation set
    laid out as the embedded suite's xray set, with 8 fresh images; returns the evaluation set's folder."""
    params = yaml.safe_load(write_params(root).read_text())
    params["curate"].update(sources=[{"name": "corpus", "kind": "manifest", "path": "corpus/manifest.jsonl"}],
                            workers=0, durable=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    corpus = root / "data" / "corpus"
    (corpus / "images").mkdir(parents=True)
    lines = []
    for i in range(12):
        Image.fromarray(_image(i)).save(corpus / "images" / f"{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "image": f"images/{i}.png", "split": "train" if i < 10 else "test",
                                 "caption": f"Chest X-ray number {i}: clear lungs.", "modality": "xray"}))
    (corpus / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    from mmkd.config import load_params

    [entry] = [e for e in suite_entries(load_params(root / "params.yaml")) if e.name == "embedded-xray"]
    evalset = root / "data" / "eval" / "embedded" / entry.path
    (evalset / "images").mkdir(parents=True)
    rows = []
    for i in range(8):
        name = f"images/fresh-{i}.png"
        Image.fromarray(_image(1000 + i)).save(evalset / name)
        rows.append((name, entry.classes[i % len(entry.classes)], "test" if i % 2 else "train"))
    _write_csv(evalset, rows)
    return evalset


def _write_csv(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    text = "image,label,split,caption\n" + "".join(f"{n},{c},{s},A chest X-ray showing {c}.\n" for n, c, s in rows)
    (folder / "manifest.csv").write_text(text)


def _plant(evalset: Path, corpus: Path) -> None:
    """A byte copy of train image r0, r1 brightened by one grey level in a corner, and a copy of test image r10."""
    rows = [tuple(line.split(",")[:3]) for line in (evalset / "manifest.csv").read_text().splitlines()[1:]]
    shutil.copy(corpus / "images" / "0.png", evalset / "images" / "planted-exact.png")
    altered = _image(1).astype(np.int16)
    altered[:16, :16] += 1
    Image.fromarray(np.clip(altered, 0, 255).astype(np.uint8)).save(evalset / "images" / "planted-near.png")
    shutil.copy(corpus / "images" / "10.png", evalset / "images" / "planted-test.png")
    rows += [("images/planted-exact.png", rows[0][1], "test"), ("images/planted-near.png", rows[0][1], "test"),
             ("images/planted-test.png", rows[0][1], "test")]
    _write_csv(evalset, rows)


@pytest.fixture()
def ctx(tmp_path):
    from mmkd.steps import Context

    evalset = _workspace(tmp_path)
    _plant(evalset, tmp_path / "data" / "corpus")
    return Context.load(tmp_path)


def test_planted_images_are_caught_at_curation_and_fail_validation(ctx, tmp_path):
    from mmkd.steps import run_step
    from mmkd.validation.suite import ValidationFailed, validate

    run_step("curate", ctx)
    report = json.loads((ctx.ws.curated / REPORT).read_text())
    xray = report["datasets"]["embedded-xray"]
    assert xray["images"] == 11
    assert xray["exact"] == {"train": 1, "probe": 0, "test": 1} and xray["near"]["train"] == 1
    found = {(o["eval_image"], o["curated_id"], o["match"], o["curated_split"]) for o in report["overlaps"]}
    assert found == {("xray/images/planted-exact.png", "r0", "exact", "train"),
                     ("xray/images/planted-near.png", "r1", "near", "train"),
                     ("xray/images/planted-test.png", "r10", "exact", "test")}
    assert report["store"]["records"] == 12
    with pytest.raises(ValidationFailed) as err:
        validate(ctx.ws.curated, ctx.params.curate, ctx.params.validate_.model_copy(
                 update={"min_split_rows": {"train": 1, "probe": 0, "test": 1}, "min_rows_per_modality": 1}),
                 tmp_path / "docs", tmp_path / "v.json", ["xray"])
    msg = str(err.value)
    assert "exact_train_overlap_at_most" in msg and "near_train_overlap_at_most" in msg
    assert "xray/images/planted-exact.png = curated 'r0'" in msg and "planted-near.png = curated 'r1'" in msg
    assert "planted-test" not in msg  # a test-split overlap is reported, not a failure
    assert json.loads((tmp_path / "v.json").read_text())["contamination"]["totals"]["exact"]["train"] == 1
    # a threshold above the dataset's share (1 of 11 images each) lets it pass
    loose = ctx.params.validate_.model_copy(update={"max_contaminated_fraction": 0.1,
                                                    "max_near_duplicate_fraction": 0.1})
    summary, failures, _ = contamination_failures(ctx.ws.curated, loose)
    assert failures == [] and summary["checked"] and summary["contaminated_datasets"]["embedded-xray"] == {
        "exact_train_fraction": round(1 / 11, 6), "near_train_fraction": round(1 / 11, 6)}


def test_clean_data_has_no_overlap_and_a_second_check_uses_the_cache(tmp_path):
    from mmkd.data.curate import curate
    from mmkd.data.contamination import write_report
    from mmkd.steps import Context

    evalset = _workspace(tmp_path)
    ctx = Context.load(tmp_path)
    curate(ctx.ws.data, ctx.ws.curated, ctx.params.curate)
    first = workspace_report(ctx.params, ctx.ws)
    assert first["images"] == 8 and first["overlaps"] == []
    assert first["cache"] == {"hits": 0, "computed": 8} and cache_path(ctx.ws).exists()
    assert all(n == 0 for d in first["datasets"].values() for k in ("exact", "near") for n in d[k].values())
    write_report(ctx.ws.curated, first)
    assert contamination_failures(ctx.ws.curated, ctx.params.validate_)[1] == []
    second = workspace_report(ctx.params, ctx.ws)
    assert second["cache"] == {"hits": 8, "computed": 0}
    assert {k: v for k, v in second.items() if k != "cache"} == {k: v for k, v in first.items() if k != "cache"}
    # a file rewritten in place is hashed again: the cache is keyed by path, size and mtime
    Image.fromarray(_image(1)).save(evalset / "images" / "fresh-3.png")  # now a copy of train image r1
    summary = contamination_summary(ctx.params, ctx.ws)
    assert summary["totals"]["exact"]["train"] == 1
    assert summary["examples"] == ["embedded-xray: xray/images/fresh-3.png = r1 (exact, train)"]
    third = workspace_report(ctx.params, ctx.ws)
    assert third["cache"] == {"hits": 8, "computed": 0}


def test_a_stale_report_fails_validation(tmp_path):
    from mmkd.data.curate import curate
    from mmkd.data.contamination import write_report
    from mmkd.steps import Context

    _workspace(tmp_path)
    ctx = Context.load(tmp_path)
    curate(ctx.ws.data, ctx.ws.curated, ctx.params.curate)
    report = workspace_report(ctx.params, ctx.ws)
    write_report(ctx.ws.curated, {**report, "store": {**report["store"], "manifest": "0" * 32}})
    [failure] = contamination_failures(ctx.ws.curated, ctx.params.validate_)[1]
    assert failure["expectation"] == "contamination_report_matches_store"
    (ctx.ws.curated / REPORT).unlink()
    summary, failures, _ = contamination_failures(ctx.ws.curated, ctx.params.validate_)
    assert summary["checked"] is False and failures == []


def test_the_embedded_suite_is_clean_against_the_smoke_corpus(smoke_corpus):
    """The curate step checked every image of the synthetic suite (its own RNG namespace) and found no overlap."""
    from mmkd.data.contamination import summarise

    report = json.loads((smoke_corpus / "artifacts" / "curated" / REPORT).read_text())
    assert report["images"] > 500 and len(report["datasets"]) >= 10 and report["unreadable"] == []
    assert report["overlaps"] == [] and summarise(report)["contaminated_datasets"] == {}
    assert contamination_failures(smoke_corpus / "artifacts" / "curated", ValidateCfg())[1] == []
