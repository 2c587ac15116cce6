"""Tests the VQA, survival and MIL evaluation tasks on embeddings whose right answer is known by construction, and
the resampling each one's CI and paired tests use (VQA by image, survival by patient, MIL over head seeds)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sksurv.metrics import concordance_index_censored
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


def test_vqa_resamples_images_with_all_their_questions():
    """Three test questions per image, answered all right or all wrong per image: the questions of an image are
    one observation, so the image-clustered CI is wider than one that counts them as independent, and every
    resample holds each image's questions together."""
    rng = np.random.default_rng(4)
    n_img, per = 120, 3
    image_ids = np.repeat(np.arange(n_img), per)
    good = rng.random(n_img) < 0.6  # images whose answer the embedding gives away
    answers_all = ["yes", "no", "maybe"]
    answers = [str(rng.choice(answers_all)) for _ in image_ids]
    code = rng.normal(size=(3, 32))
    img = np.where(good[image_ids][:, None], code[[answers_all.index(a) for a in answers]],
                   rng.normal(size=(len(image_ids), 32)))
    split = np.where(image_ids < 80, "train", "test")  # a split by image
    kw = dict(image_emb=_unit(img), question_emb=_unit(rng.normal(size=(len(image_ids), 32))), answers=answers,
              question_types=["KG"] * len(image_ids), split=split, seed=0)
    found: dict = {}
    clustered = vqa(**kw, image_ids=image_ids, outcomes=found)
    naive = vqa(**kw)  # every question its own cluster
    assert clustered["vqa_acc"] == naive["vqa_acc"]
    width = clustered["vqa_acc_ci_high"] - clustered["vqa_acc_ci_low"]
    assert width > 1.3 * (naive["vqa_acc_ci_high"] - naive["vqa_acc_ci_low"])
    o = found["vqa_acc"]
    assert o.n == 120 and np.array_equal(o.clusters, image_ids[split == "test"])
    assert o.value() == clustered["vqa_acc"]
    for idx in o.plan(42, resamples=30):
        drawn = o.clusters[idx]
        assert all((drawn == k).sum() % per == 0 for k in np.unique(drawn))  # an image's 3 questions together


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
    assert out["cindex_folds"] == 5
    assert out["cindex_harrell_ci_low"] <= out["cindex_harrell"] <= out["cindex_harrell_ci_high"]
    assert out["cindex_alpha"] > 0


def test_survival_random_features_near_half():
    time, event = _surv_data(200, 1)
    x = _unit(np.random.default_rng(1).normal(size=(200, 128)))
    out = survival(x, time, event, seed=0)
    assert abs(out["cindex_harrell"] - 0.5) < 0.1 and abs(out["cindex_uno"] - 0.5) < 0.1
    assert out == survival(x, time, event, seed=0)


def test_survival_ci_is_a_bootstrap_over_patients_of_out_of_fold_risks():
    """The C-index is Harrell's C of the pooled out-of-fold risks (sksurv's on the stored risks, exactly), and
    its CI the percentile interval of that C recomputed on resamples of patients: a real interval, not the
    spread of 5 folds, that narrows as patients are added."""
    found: dict = {}
    time, event = _surv_data(200, 5)
    rng = np.random.default_rng(5)
    x = np.c_[-np.log(time) + rng.normal(0, 1.0, 200), rng.normal(size=(200, 15))]
    out = survival(x, time, event, seed=0, outcomes=found)
    o = found["cindex_harrell"]
    risk = o.data["risk"][0]
    assert o.n == 200 and o.clusters is None and risk.std() > 0  # one risk per patient, out of fold
    assert out["cindex_harrell"] == pytest.approx(concordance_index_censored(event.astype(bool), time, risk)[0])
    idx = o.plan(42, resamples=5)[0]
    assert o.value(idx) == pytest.approx(concordance_index_censored(event[idx].astype(bool), time[idx], risk[idx])[0])
    low, high = out["cindex_harrell_ci_low"], out["cindex_harrell_ci_high"]
    assert 0.5 < low < out["cindex_harrell"] < high < 1.0 and high - low > 0.03
    time2, event2 = np.tile(time, 2), np.tile(event, 2)
    noise = np.random.default_rng(6)
    x2 = np.c_[-np.log(time2) + noise.normal(0, 1.0, 400), noise.normal(size=(400, 15))]
    big = survival(x2, time2, event2, seed=0)  # twice the patients: about 1/sqrt(2) of the width
    assert big["cindex_harrell_ci_high"] - big["cindex_harrell_ci_low"] < 0.85 * (high - low)


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_survival_with_few_events_still_scores_every_patient():
    time, _ = _surv_data(100, 2)
    event = np.zeros(100, int)
    event[:3] = 1  # three events, five folds: two test folds have no event of their own
    x = np.random.default_rng(2).normal(size=(100, 16))
    out = survival(x, time, event, seed=0)
    assert out["cindex_folds"] == 5 and np.isfinite(out["cindex_harrell"])


def test_survival_diverging_fits_retried_then_nan(monkeypatch):
    """sksurv raises ArithmeticError when a small penalty diverges: the next path floor is tried; a fold whose
    every floor diverges predicts no risk and is not counted, and with no fold fitted the C-indices are NaN."""
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
    assert out["cindex_harrell"] > 0.95 and out["cindex_folds"] == 3

    def broken(self, *args):
        raise ArithmeticError("Numerical error, because weights are too large")

    monkeypatch.setattr(survival_mod.CoxnetSurvivalAnalysis, "fit", broken)
    out = survival(x, time, event, seed=0, folds=3)
    assert np.isnan(out["cindex_harrell"]) and np.isnan(out["cindex_uno"]) and out["cindex_folds"] == 0


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


def test_mil_over_head_seeds_is_the_mean_of_single_seed_runs():
    """Seed s of a multi-seed run is a single-seed run at s (its own fold split and initialisation): the reported
    AUC is the mean of theirs, and the stored outcome recomputes it from every seed's out-of-fold probabilities."""
    bags, labels = _mil_data(60, 16, 4, keyed=False)
    kw = dict(bags=bags, labels=labels, n_classes=2, folds=3, epochs=5)
    found: dict = {}
    both = mil(**kw, seed=3, head_seeds=2, outcomes=found)
    singles = [mil(**kw, seed=s)["mil_auc"] for s in (3, 4)]
    assert singles[0] != singles[1]  # training randomness that one seed would hide
    assert both["mil_auc"] == pytest.approx(np.mean(singles))
    o = found["mil_auc"]
    assert o.data["scores"].shape == (2, 60, 2) and o.value() == pytest.approx(both["mil_auc"])
    assert np.array_equal(o.strata, labels)


def test_mil_deterministic_thread_safe_and_rejects_empty_bags():
    bags, labels = _mil_data(60, 16, 3)
    _same_in_threads(mil, {"bags": bags, "labels": labels, "n_classes": 2, "seed": 1, "folds": 3, "epochs": 10})
    with pytest.raises(ValueError, match="instance"):
        mil(bags[:-1] + [np.zeros((0, 16), np.float32)], labels, 2, seed=0)
