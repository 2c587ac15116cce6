"""Code tests: the evaluation's reports (CI-aware win/tie/loss, ranks, means, plots) and its embedding cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmkd.evaluation.dataset import ArrayImages, EvalDataset
from mmkd.evaluation.embeddings import dataset_embeddings
from mmkd.evaluation.report import (comparisons, mean_ranks, metrics_json, outcome, win_tie_loss, write_reports)
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


def test_outcome_ties_when_the_intervals_overlap_and_otherwise_goes_by_value():
    assert outcome((0.80, 0.75, 0.85), (0.60, 0.55, 0.65)) == "win"
    assert outcome((0.60, 0.55, 0.65), (0.80, 0.75, 0.85)) == "loss"
    assert outcome((0.80, 0.75, 0.85), (0.84, 0.80, 0.88)) == "tie"  # 4 points apart, inside the noise
    assert outcome((0.80, 0.75, 0.85), (0.70, 0.65, 0.75)) == "tie"  # intervals touch
    nan = float("nan")
    assert outcome((0.5, nan, nan), (0.5, nan, nan)) == "tie"
    assert outcome((0.6, nan, nan), (0.5, nan, nan)) == "win"


def test_win_tie_loss_per_task_and_mean_ranks_by_hand():
    rows = comparisons(PLAN, RESULTS)
    assert [(r["dataset"], r["metric"]) for r in rows] == [("a", "zeroshot_acc1"), ("b", "zeroshot_acc1"),
                                                          ("b", "mil_auc")]
    assert win_tie_loss(rows, "student", "t1") == {"all": {"win": 1, "tie": 2, "loss": 0}}
    assert win_tie_loss(rows, "student", "t2", key=lambda r: r["task"]) == {
        "zeroshot": {"win": 0, "tie": 1, "loss": 1}, "mil": {"win": 1, "tie": 0, "loss": 0}}
    # ranks: a: student 1, t2 2, t1 3; b/zeroshot: t2 1, student 2, t1 3; b/mil: t1 1, student 2, t2 3
    assert mean_ranks(rows, ["student", "t1", "t2"]) == pytest.approx({"student": 5 / 3, "t1": 7 / 3, "t2": 2.0})


def test_means_cover_the_union_of_metrics_and_reports_write_everything(tmp_path):
    means = metrics_json(RESULTS)["student"]["mean"]
    assert means["zeroshot_acc1"] == pytest.approx(0.75) and means["zeroshot_acc1_n_sets"] == 2
    counts = metrics_json({"m": {"a": {"probe_acc1": 0.5, "probe_c": 100.0, "n_test": 9.0}}})["m"]["mean"]
    assert counts == {"probe_acc1": 0.5, "probe_acc1_n_sets": 1}  # settings and sizes are not averaged
    assert means["mil_auc"] == pytest.approx(0.9) and means["mil_auc_n_sets"] == 1
    results_dir = tmp_path / "results"
    for model, per in RESULTS.items():
        for d, m in per.items():
            (results_dir / model).mkdir(parents=True, exist_ok=True)
            (results_dir / model / f"{d}.json").write_text(json.dumps({"metrics": m}))
    (results_dir / "t2" / "b.json").write_text(json.dumps({"error": "ValueError: broken image"}))
    plan = {**PLAN, "missing": {"pcam": "missing: data/eval/pcam"}}
    out = write_reports(plan, results_dir, tmp_path / "metrics.json", tmp_path / "leaderboard.md",
                        tmp_path / "plots", tmp_path / "evaluation.json")
    assert out["status"]["failed"] == {"t2/b": "ValueError: broken image"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "b" not in metrics["t2"] and metrics["t1"]["a"]["in_domain"] == 1.0 and metrics["t2"]["a"]["in_domain"] == 0.0
    board = (tmp_path / "leaderboard.md").read_text()
    assert "pcam: missing" in board and "t2/b: failed (ValueError: broken image)" in board
    assert "| t1 | 1/2/0 |" in board  # student vs t1: all comparisons
    delta = (tmp_path / "plots" / "student_vs_best_teacher.csv").read_text().splitlines()
    assert delta[0].startswith("label,dataset,task") and len(delta) == 4
    assert "a:zeroshot_acc1,a,zeroshot,zeroshot_acc1,xray,0.8,t2,0.79,0.01" in delta
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


def test_the_evaluation_id_changes_with_the_datasets_their_sizes_and_the_settings():
    from mmkd.evaluation.report import evaluation_id

    plan = {**PLAN, "settings": {"seed": 1, "folds": 5}}
    sized = {m: {d: {**v, "n_test": 400.0} for d, v in per.items()} for m, per in RESULTS.items()}
    base = evaluation_id(plan, sized)
    assert base == evaluation_id(json.loads(json.dumps(plan)), sized)  # a pure function of what was measured
    assert base != evaluation_id({**plan, "settings": {"seed": 1, "folds": 3}}, sized)
    assert base != evaluation_id({**plan, "datasets": plan["datasets"][:1]}, sized)
    smaller = {m: {d: {**v, "n_test": 300.0} for d, v in per.items()} for m, per in RESULTS.items()}
    assert base != evaluation_id(plan, smaller)
