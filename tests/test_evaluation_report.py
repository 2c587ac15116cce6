"""Code tests: the evaluation's reports (paired win/tie/loss, the distillation gain, ranks, means, plots, the
evaluation id) and its embedding cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmkd.evaluation.dataset import ArrayImages, EvalDataset
from mmkd.evaluation.embeddings import dataset_embeddings
from mmkd.evaluation.paired import PairedTests, add_paired
from mmkd.evaluation.report import comparisons, mean_ranks, metrics_json, win_tie_loss, write_reports
from mmkd.evaluation.run import read_outcomes, write_outcomes, write_result
from mmkd.evaluation.stats import Outcome
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import ImageSpec

PLAN = {
    "models": [{"name": "student", "kind": "student", "domain": None},
               {"name": "t1", "kind": "teacher", "domain": ["xray"]},
               {"name": "t2", "kind": "teacher", "domain": ["pathology"]}],
    "datasets": [{"name": "a", "modalities": ["xray"], "modality": "xray", "tasks": ["zeroshot"]},
                 {"name": "b", "modalities": ["pathology"], "modality": "pathology", "tasks": ["zeroshot", "mil"]}],
    "missing": {},
}


def _m(v, lo, hi, key="zeroshot_acc1"):
    return {key: v, f"{key}_ci_low": lo, f"{key}_ci_high": hi}


RESULTS = {
    "student": {"a": _m(0.80, 0.75, 0.85), "b": {**_m(0.70, 0.65, 0.75), **_m(0.9, 0.85, 0.95, "mil_auc")}},
    "t1": {"a": _m(0.60, 0.55, 0.65), "b": {**_m(0.68, 0.63, 0.73), **_m(0.95, 0.90, 0.99, "mil_auc")}},
    "t2": {"a": _m(0.79, 0.74, 0.84), "b": {**_m(0.90, 0.86, 0.94), **_m(0.7, 0.6, 0.8, "mil_auc")}},
}


def _acc(n_correct: int, n: int = 200, extra: tuple = ()) -> Outcome:
    """Zero-shot correctness: the first n_correct items right (and `extra` ones), classes alternating."""
    v = np.zeros(n)
    v[:n_correct] = 1
    v[list(extra)] = 1
    return Outcome("mean", {"values": v}, strata=np.arange(n) % 2, design="items, stratified by class")


def _auc(noise: float | None, seed: int) -> Outcome:
    """MIL probabilities for 100 bags: the label plus noise (None: random scores)."""
    rng = np.random.default_rng(seed)
    y = np.arange(100) % 2
    p1 = rng.random(100) if noise is None else np.clip(0.5 + (y - 0.5) * 0.6 + noise * rng.normal(size=100), 0, 1)
    return Outcome("auc", {"scores": np.stack([1 - p1, p1], 1)[None], "labels": y}, strata=y,
                   design="bags, stratified by class")


# student vs t1: a win (0.80 vs 0.60, nested errors), a tie (the same accuracy, other errors), a loss (t1's MIL
# is perfect); vs t2: a tie (two items apart), a loss (0.70 vs 0.90), a win (t2's MIL is random)
OUTCOMES = {
    "student": {"a": {"zeroshot_acc1": _acc(160)}, "b": {"zeroshot_acc1": _acc(140), "mil_auc": _auc(0.35, 1)}},
    "t1": {"a": {"zeroshot_acc1": _acc(120)}, "b": {"zeroshot_acc1": _acc(136, extra=(150, 151, 152, 153)),
                                                    "mil_auc": _auc(0.0, 2)}},
    "t2": {"a": {"zeroshot_acc1": _acc(158)}, "b": {"zeroshot_acc1": _acc(180), "mil_auc": _auc(None, 3)}},
    "student_stage1": {"a": {"zeroshot_acc1": _acc(100)},
                       "b": {"zeroshot_acc1": _acc(130), "mil_auc": _auc(0.5, 4)}},
}
OUTCOME_PLAN = {**PLAN, "models": [*PLAN["models"], {"name": "student_stage1", "kind": "student", "domain": None}]}


def _results(outcomes: dict) -> dict:
    return {m: {d: {k: v for name, o in per_d.items() for k, v in o.with_ci(name, o.plan(42), {}).items()}
                for d, per_d in per.items()} for m, per in outcomes.items()}


def test_win_tie_loss_comes_from_paired_tests_on_the_same_resamples():
    results = _results(OUTCOMES)
    rows = comparisons(OUTCOME_PLAN, results)
    add_paired(rows, PairedTests(OUTCOMES, seed=42), "student", ["t1", "t2", "student_stage1"])
    assert win_tie_loss(rows, "student", "t1", key=lambda r: r["metric"]) == {
        "zeroshot_acc1": {"win": 1, "tie": 1, "loss": 0}, "mil_auc": {"win": 0, "tie": 0, "loss": 1}}
    assert win_tie_loss(rows, "student", "t2") == {"all": {"win": 1, "tie": 1, "loss": 1}}
    a = rows[0]["paired"]
    assert a["t1"]["diff"] == pytest.approx(0.2) and 0.1 < a["t1"]["low"] < 0.2 < a["t1"]["high"]
    assert a["t2"]["diff"] == pytest.approx(0.01) and a["t2"]["low"] == 0.0 and a["t2"]["verdict"] == "tie"
    # unpaired, the student's own CI on b (0.70) holds t1's 0.70 and more: overlapping CIs could not call it
    r1 = results["student"]["b"]
    assert r1["zeroshot_acc1_ci_low"] < 0.66 and r1["zeroshot_acc1_ci_high"] > 0.74


def test_ranks_by_hand():
    rows = comparisons(PLAN, RESULTS)
    assert [(r["dataset"], r["metric"]) for r in rows] == [("a", "zeroshot_acc1"), ("b", "zeroshot_acc1"),
                                                          ("b", "mil_auc")]
    # ranks: a: student 1, t2 2, t1 3; b/zeroshot: t2 1, student 2, t1 3; b/mil: t1 1, student 2, t2 3
    assert mean_ranks(rows, ["student", "t1", "t2"]) == pytest.approx({"student": 5 / 3, "t1": 7 / 3, "t2": 2.0})
    # a model outside the plan (metrics.json's `gain`) is no competitor
    assert all("gain" not in r["values"] for r in comparisons(PLAN, {**RESULTS, "gain": RESULTS["t1"]}))


def test_the_report_redraws_the_tasks_plans():
    """Each value's CI (drawn in the unit) and its paired tests (drawn in the report) share one plan: one seed."""
    from mmkd.evaluation import report, tasks

    assert report.BOOTSTRAP_SEED == tasks.BOOTSTRAP_SEED


def test_outcomes_survive_their_file(tmp_path):
    path = write_outcomes(tmp_path / "x.outcomes.npz", OUTCOMES["student"]["b"])
    back = read_outcomes(path)
    assert set(back) == {"zeroshot_acc1", "mil_auc"}
    for name, o in OUTCOMES["student"]["b"].items():
        assert back[name].same_items(o) and back[name].value() == o.value() and back[name].design == o.design


def test_means_cover_the_union_of_metrics_and_reports_write_everything(tmp_path):
    means = metrics_json(RESULTS)["student"]["mean"]
    assert means["zeroshot_acc1"] == pytest.approx(0.75) and means["zeroshot_acc1_n_sets"] == 2
    counts = metrics_json({"m": {"a": {"probe_acc1": 0.5, "probe_c": 100.0, "n_test": 9.0}}})["m"]["mean"]
    assert counts == {"probe_acc1": 0.5, "probe_acc1_n_sets": 1}  # settings and sizes are not averaged
    assert means["mil_auc"] == pytest.approx(0.9) and means["mil_auc_n_sets"] == 1
    results_dir = tmp_path / "results"
    for model, per in _results(OUTCOMES).items():
        for d, m in per.items():
            write_result(results_dir, model, d, {"metrics": m, "outcomes": OUTCOMES[model][d],
                                                 "dataset_fingerprint": f"fp-{d}"})
    (results_dir / "t2" / "b.json").write_text(json.dumps({"error": "ValueError: broken image"}))
    plan = {**OUTCOME_PLAN, "missing": {"pcam": "missing: data/eval/pcam"}, "settings": {"head_seeds": 3}}
    out = write_reports(plan, results_dir, tmp_path / "metrics.json", tmp_path / "leaderboard.md",
                        tmp_path / "plots", tmp_path / "evaluation.json")
    assert out["status"]["failed"] == {"t2/b": "ValueError: broken image"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "b" not in metrics["t2"] and metrics["t1"]["a"]["in_domain"] == 1.0
    assert metrics["t2"]["a"]["in_domain"] == 0.0
    assert metrics["student"]["mean"]["zeroshot_acc1"] == pytest.approx(0.75)  # the promotion gate's metric
    # the gain: student minus student_stage1 (zero-shot and probe only), per set and over sets, with paired CIs
    gain = metrics["gain"]
    assert set(gain) == {"a", "b", "mean"}
    assert set(gain["b"]) == {"zeroshot_acc1", "zeroshot_acc1_ci_low", "zeroshot_acc1_ci_high"}
    assert gain["a"]["zeroshot_acc1"] == pytest.approx(0.3) and gain["a"]["zeroshot_acc1_ci_low"] > 0.2
    assert gain["mean"]["zeroshot_acc1"] == pytest.approx(0.175) and gain["mean"]["zeroshot_acc1_n_sets"] == 2
    assert 0.12 < gain["mean"]["zeroshot_acc1_ci_low"] < 0.175 < gain["mean"]["zeroshot_acc1_ci_high"] < 0.23
    board = (tmp_path / "leaderboard.md").read_text()
    assert "pcam: missing" in board and "t2/b: failed (ValueError: broken image)" in board
    assert "| t1 | 1/1/1 |" in board  # student vs t1: all comparisons, paired
    assert ("- zeroshot: paired bootstrap of the difference, 1000 resamples, clusters: items, stratified by class"
            in board)
    assert ("- mil: paired bootstrap of the difference, 1000 resamples, clusters: bags, stratified by class; "
            "heads over 3 seeds") in board
    assert "## Distillation gain: student minus student_stage1" in board and "| a | zeroshot_acc1 | +0.300 [" in board
    status = json.loads((tmp_path / "evaluation.json").read_text())
    assert status["fingerprints"] == {"a": "fp-a", "b": "fp-b"} and status["unpaired"] == []
    delta = (tmp_path / "plots" / "student_vs_best_teacher.csv").read_text().splitlines()
    assert delta[0].startswith("label,dataset,task") and len(delta) == 4
    assert (tmp_path / "plots" / "per_task.png").stat().st_size > 0


class PixelEncoder(Encoder):
    """A real (if simple) encoder: the mean colour of an image, and a text's length and vowels."""

    calls = 0

    def forward_images(self, x: torch.Tensor) -> torch.Tensor:
        PixelEncoder.calls += 1
        return x.mean((2, 3)) + 1e-3

    def forward_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), sum(c in "aeiou" for c in t), 1.0] for t in texts])


def test_embeddings_are_cached_per_model_and_dataset_and_refreshed_when_anything_changes(tmp_path):
    rng = np.random.default_rng(0)
    ds = EvalDataset("toy", "xray", ArrayImages(rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)),
                     captions=["one", "two", "two"])
    enc = PixelEncoder("pix", ImageSpec(size=8), torch.device("cpu"), version="v1")
    prompts = {"normal": ["a normal chest"], "effusion": ["an effusion"]}
    first, cached = dataset_embeddings(enc, "v1", ds, prompts, 2, tmp_path)
    assert not cached and first.image.shape == (5, 3) and first.of(["two", "an effusion"]).shape == (2, 3)
    assert len(first.texts) == 4  # duplicates encoded once
    calls = PixelEncoder.calls
    again, cached = dataset_embeddings(enc, "v1", ds, prompts, 2, tmp_path)
    assert cached and PixelEncoder.calls == calls and np.array_equal(again.image, first.image)
    _, cached = dataset_embeddings(enc, "v2", ds, prompts, 2, tmp_path)  # new weights
    assert not cached
    ds.images = ArrayImages(rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8))  # new images
    _, cached = dataset_embeddings(enc, "v2", ds, prompts, 2, tmp_path)
    assert not cached


def test_the_evaluation_id_changes_with_the_datasets_their_sizes_their_contents_and_the_settings():
    from mmkd.evaluation.report import evaluation_id

    plan = {**PLAN, "settings": {"seed": 1, "folds": 5}}
    sized = {m: {d: {**v, "n_test": 400.0} for d, v in per.items()} for m, per in RESULTS.items()}
    base = evaluation_id(plan, sized)
    assert base == evaluation_id(json.loads(json.dumps(plan)), sized)  # a pure function of what was measured
    assert base != evaluation_id({**plan, "settings": {"seed": 1, "folds": 3}}, sized)
    assert base != evaluation_id({**plan, "datasets": plan["datasets"][:1]}, sized)
    smaller = {m: {d: {**v, "n_test": 300.0} for d, v in per.items()} for m, per in RESULTS.items()}
    assert base != evaluation_id(plan, smaller)
    contents = evaluation_id(plan, sized, {"a": "1f2e", "b": "77aa"})
    assert contents == evaluation_id(plan, sized, {"a": "1f2e", "b": "77aa"})
    assert contents != evaluation_id(plan, sized, {"a": "1f2e", "b": "77ab"})  # same names and sizes, new bytes


def test_the_dataset_fingerprint_reads_contents_not_names(tmp_path):
    """Two suites with the same file names, sizes and items but one changed pixel differ; the same bytes at
    another path, written later, do not."""
    from types import SimpleNamespace

    from PIL import Image

    from mmkd.evaluation.dataset import FileImages
    from mmkd.evaluation.run import dataset_fingerprint

    entry = SimpleNamespace(tasks=["zeroshot"], prompts={"a": ["an a"]})
    pixels = np.zeros((4, 4, 3), np.uint8)
    fps = []
    for folder, value in (("one", 0), ("two", 0), ("three", 1)):
        path = tmp_path / folder / "img.png"
        path.parent.mkdir()
        pixels[0, 0, 0] = value
        Image.fromarray(pixels).save(path)
        ds = EvalDataset("s", "xray", FileImages([path]), item_image=np.array([0]), item_split=np.array(["test"]),
                         labels=np.array([0]), classes=["a"])
        fps.append(dataset_fingerprint(ds, entry))
    assert fps[0] == fps[1] != fps[2]
