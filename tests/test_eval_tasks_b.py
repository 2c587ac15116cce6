"""Tests the VQA, survival and MIL evaluation tasks on embeddings whose right answer is known by construction."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sksurv.util import Surv

from mmkd.evaluation.tasks import survival as survival_mod
from mmkd.evaluation.tasks.mil import auc_ovr, balanced_acc, mil
from mmkd.evaluation.tasks.survival import _uno, survival
from mmkd.evaluation.tasks.vqa import type_key, vqa


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _same_in_threads(fn, kwargs: dict) -> None:
    """Two concurrent calls give exactly what two sequential calls give (no shared RNG state)."""
    first, second = fn(**kwargs), fn(**kwargs)
    assert first == second
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: fn(**kwargs), range(2)))
    assert results == [first, first]


# --- VQA ------------------------------------------------------------------------------------------------------

VOCAB = {"Organ": ["lung", "liver", "heart"], "KG": ["yes", "no"], "Abnormality / Plane": ["axial", "coronal"]}


def _vqa_data(n: int, d: int, seed: int, encode: bool):
    """Questions of three types; with `encode`, the image embedding is its answer's own random unit vector (the
    answer given away in every dimension), else noise."""
    rng = np.random.default_rng(seed)
    answers_all = sorted({a for v in VOCAB.values() for a in v})
    types = list(rng.choice(list(VOCAB), n))
    answers = [str(rng.choice(VOCAB[t])) for t in types]
    img = rng.normal(size=(n, d))
    if encode:
        img = rng.normal(size=(len(answers_all), d))[[answers_all.index(a) for a in answers]]
    q = rng.normal(size=(n, d))
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 5) + ["test"] * (n - n // 2 - n // 5))
    return {"image_emb": _unit(img), "question_emb": _unit(q), "answers": answers, "question_types": types,
            "split": split, "seed": 0}


def test_vqa_answer_in_embedding_is_perfect_and_per_type():
    data = _vqa_data(300, 32, 0, encode=True)
    out = vqa(**data)
    assert out["vqa_acc"] == 1.0 and out["vqa_acc_ci_low"] == 1.0
    assert {k for k in out if k.startswith("vqa_acc_") and "_ci_" not in k} == {
        "vqa_acc_organ", "vqa_acc_kg", "vqa_acc_abnormality_plane"}
    assert out["vqa_n_answers"] == 7 and out["vqa_n_test"] == 90


def test_vqa_unseen_test_answer_is_wrong_and_answers_normalised():
    data = _vqa_data(300, 32, 0, encode=True)
    test = np.flatnonzero(data["split"] == "test")
    data["answers"][test[0]] = "zebra"  # never in train: can only be wrong
    data["answers"][test[1]] = data["answers"][test[1]].upper() + " "  # same answer, other spelling
    out = vqa(**data)
    assert out["vqa_acc"] == pytest.approx(89 / 90)
    assert out["vqa_n_answers"] == 7


def test_vqa_random_embeddings_near_majority():
    rng = np.random.default_rng(1)
    n = 600
    answers = list(np.where(rng.random(n) < 0.7, "yes", "no"))
    split = np.array(["train"] * 400 + ["test"] * 200)  # no val: fixed epochs
    out = vqa(_unit(rng.normal(size=(n, 32))), _unit(rng.normal(size=(n, 32))), answers, ["KG"] * n, split, 0)
    majority = np.mean(np.array(answers)[split == "test"] == "yes")
    assert majority - 0.2 < out["vqa_acc"] < majority + 0.07
    assert out["vqa_acc_ci_low"] < out["vqa_acc"] < out["vqa_acc_ci_high"]


def test_vqa_deterministic_and_thread_safe():
    _same_in_threads(vqa, _vqa_data(200, 16, 2, encode=False))


def test_vqa_needs_test_questions():
    data = _vqa_data(50, 8, 0, encode=True)
    data["split"] = np.array(["train"] * 50)
    with pytest.raises(ValueError, match="test"):
        vqa(**data)
    assert type_key("PRES, POS") == "pres_pos"


# --- survival -------------------------------------------------------------------------------------------------

def _surv_data(n: int, seed: int, censor_rate: float = 0.3):
    rng = np.random.default_rng(seed)
    time = rng.exponential(100.0, n) + 1.0
    event = (rng.random(n) > censor_rate).astype(int)
    return time, event


def test_survival_monotone_features_concordant():
    time, event = _surv_data(200, 0)
    x = np.zeros((200, 64), np.float32)
    x[:, 0] = -np.log(time)  # risk falls as time grows: a perfect ranking
    x[:, 1:] = np.random.default_rng(0).normal(size=(200, 63)) * 1e-3
    out = survival(x, time, event, seed=0)
    assert out["cindex_harrell"] > 0.95 and out["cindex_uno"] > 0.95
    assert out["cindex_harrell_folds"] == 5 and out["cindex_uno_folds"] == 5
    assert out["cindex_harrell_ci_low"] <= out["cindex_harrell"] <= out["cindex_harrell_ci_high"]
    assert out["cindex_alpha"] > 0


def test_survival_random_features_near_half():
    time, event = _surv_data(200, 1)
    x = _unit(np.random.default_rng(1).normal(size=(200, 128)))
    out = survival(x, time, event, seed=0)
    assert abs(out["cindex_harrell"] - 0.5) < 0.1 and abs(out["cindex_uno"] - 0.5) < 0.1
    assert out == survival(x, time, event, seed=0)


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_survival_fold_without_events_is_nan_and_counted():
    time, _ = _surv_data(100, 2)
    event = np.zeros(100, int)
    event[:3] = 1  # three events, five folds: two test folds have no comparable pair
    x = np.random.default_rng(2).normal(size=(100, 16))
    out = survival(x, time, event, seed=0)
    assert out["cindex_harrell_folds"] == 3
    assert np.isfinite(out["cindex_harrell"])


def test_survival_diverging_fits_retried_then_nan(monkeypatch):
    """sksurv raises ArithmeticError when a small penalty diverges: the next path floor is tried, and a fold
    whose every floor diverges scores NaN and is not counted."""
    time, event = _surv_data(100, 3)
    x = np.zeros((100, 8))
    x[:, 0] = -np.log(time)
    fit = survival_mod.CoxnetSurvivalAnalysis.fit

    def flaky(self, *args):
        if self.alpha_min_ratio == survival_mod.ALPHA_MIN_RATIOS[0]:
            raise ArithmeticError("Numerical error, because weights are too large")
        return fit(self, *args)

    monkeypatch.setattr(survival_mod.CoxnetSurvivalAnalysis, "fit", flaky)
    out = survival(x, time, event, seed=0, folds=3)
    assert out["cindex_harrell"] > 0.95 and out["cindex_harrell_folds"] == 3

    def broken(self, *args):
        raise ArithmeticError("Numerical error, because weights are too large")

    monkeypatch.setattr(survival_mod.CoxnetSurvivalAnalysis, "fit", broken)
    out = survival(x, time, event, seed=0, folds=3)
    assert np.isnan(out["cindex_harrell"]) and out["cindex_harrell_folds"] == 0 and out["cindex_uno_folds"] == 0


def test_uno_defined_when_test_outlives_train():
    train = Surv.from_arrays(event=[True, False, True, True, False], time=[1.0, 2.0, 3.0, 4.0, 10.0])
    test = Surv.from_arrays(event=[True, True, False, True], time=[1.5, 3.5, 8.0, 20.0])  # 20 > train max
    risk = -np.array([1.5, 3.5, 8.0, 20.0])  # perfect ranking
    assert _uno(train, test, risk) == pytest.approx(1.0)
    assert np.isnan(_uno(train, Surv.from_arrays(event=[False, False], time=[1.0, 2.0]), np.array([1.0, 0.0])))


# --- MIL ------------------------------------------------------------------------------------------------------

def _mil_data(n: int, d: int, seed: int, n_classes: int = 2, keyed: bool = True):
    """Bags of 3-11 noise instances; a bag of class c > 0 holds one copy of class c's key vector."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n_classes, d)) * 3
    labels = rng.integers(0, n_classes, n)
    bags = []
    for y in labels:
        bag = rng.normal(size=(rng.integers(3, 12), d))
        if keyed and y > 0:
            bag[rng.integers(len(bag))] = keys[y]
        bags.append(_unit(bag))
    return bags, labels


def test_metric_helpers_match_sklearn():
    rng = np.random.default_rng(0)
    y2, p2 = rng.integers(0, 2, 50), rng.dirichlet([1, 1], 50)
    y3, p3 = rng.integers(0, 3, 60), rng.dirichlet([1, 1, 1], 60)
    p3[:10] = p3[10:20]  # ties
    assert auc_ovr(y2, p2) == pytest.approx(roc_auc_score(y2, p2[:, 1]))
    assert auc_ovr(y3, p3) == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"))
    assert balanced_acc(y3, p3) == pytest.approx(balanced_accuracy_score(y3, p3.argmax(1)))


def test_mil_key_instance_found_in_variable_bags():
    bags, labels = _mil_data(120, 32, 0)
    assert len({len(b) for b in bags}) > 5
    out = mil(bags, labels, 2, seed=0)
    assert out["mil_auc"] > 0.95 and out["mil_balanced_acc"] > 0.9
    assert out["mil_auc_ci_low"] <= out["mil_auc"] <= out["mil_auc_ci_high"]


def test_mil_multiclass_keys():
    bags, labels = _mil_data(150, 32, 1, n_classes=3)
    out = mil(bags, labels, 3, seed=0)
    assert out["mil_auc"] > 0.9 and out["mil_balanced_acc"] > 0.8


def test_mil_random_labels_near_half():
    bags, labels = _mil_data(160, 32, 2, keyed=False)
    out = mil(bags, labels, 2, seed=0)
    assert abs(out["mil_auc"] - 0.5) < 0.15
    assert out["mil_auc_ci_low"] < 0.5 + 0.15 and out["mil_auc_ci_high"] > 0.5 - 0.15


def test_mil_deterministic_thread_safe_and_rejects_empty_bags():
    bags, labels = _mil_data(60, 16, 3)
    _same_in_threads(mil, {"bags": bags, "labels": labels, "n_classes": 2, "seed": 1, "folds": 3, "epochs": 10})
    with pytest.raises(ValueError, match="instance"):
        mil(bags[:-1] + [np.zeros((0, 16), np.float32)], labels, 2, seed=0)
