"""Paired bootstrap: the same resamples for both models, clusters drawn whole, checked against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmkd.evaluation.stats import paired_bootstrap, resample_plan, verdict


def test_a_toy_paired_difference_matches_the_exhaustive_bootstrap():
    """Three clusters of two items: every resample of 3 clusters with replacement, enumerated, gives the exact
    bootstrap distribution; the plan's percentile interval must sit inside it and match its quantiles closely."""
    a = np.array([1, 1, 0, 1, 1, 1], dtype=float)
    b = np.array([0, 1, 0, 0, 1, 0], dtype=float)
    clusters = np.array([0, 0, 1, 1, 2, 2])
    exact = []
    for draw in itertools.product(range(3), repeat=3):
        idx = np.concatenate([np.flatnonzero(clusters == k) for k in draw])
        exact.append(a[idx].mean() - b[idx].mean())
    plan = resample_plan(6, seed=0, resamples=4000, clusters=clusters)
    res = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), plan, 6)
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    assert min(exact) <= res["low"] <= res["high"] <= max(exact)
    assert res["low"] == pytest.approx(np.percentile(exact, 2.5), abs=0.05)
    assert res["high"] == pytest.approx(np.percentile(exact, 97.5), abs=0.05)
    # every resample keeps clusters whole: 3 clusters of 2 items -> 6 items, pairs intact
    for idx in plan[:50]:
        assert len(idx) == 6 and all(clusters[idx[j]] == clusters[idx[j + 1]] for j in range(0, 6, 2))


def test_pairing_removes_the_noise_two_separate_intervals_keep():
    """Two models that agree on hard items and differ on 6% of easy ones: unpaired CIs overlap, the paired one
    does not."""
    rng = np.random.default_rng(1)
    n = 400
    b = (rng.random(n) < 0.6).astype(float)
    a = b.copy()
    flip = rng.choice(np.flatnonzero(b == 0), 24, replace=False)
    a[flip] = 1
    plan = resample_plan(n, seed=42)
    res = paired_bootstrap(lambda i: a[i].mean(), lambda i: b[i].mean(), plan, n)
    assert verdict(res) == "win" and res["low"] > 0
    # the same models compared the other way round lose, with the mirrored interval
    back = paired_bootstrap(lambda i: b[i].mean(), lambda i: a[i].mean(), plan, n)
    assert verdict(back) == "loss" and back["high"] == pytest.approx(-res["low"])


def test_strata_keep_their_sizes_and_a_cluster_may_not_straddle_them():
    strata = np.array([0] * 5 + [1] * 3)
    for idx in resample_plan(8, seed=3, resamples=20, strata=strata):
        assert (strata[idx] == 0).sum() == 5 and (strata[idx] == 1).sum() == 3
    with pytest.raises(ValueError, match="straddles"):
        resample_plan(4, seed=0, clusters=np.array([0, 0, 1, 1]), strata=np.array([0, 1, 1, 1]))


def test_undefined_resamples_are_left_out_and_too_many_give_no_interval():
    plan = resample_plan(10, seed=0, resamples=100)

    def sometimes(idx):
        if 0 not in idx:
            raise ValueError("undefined without item 0")
        return 1.0

    res = paired_bootstrap(sometimes, lambda i: 0.5, plan, 10)
    assert 0 < res["resamples"] < 100 and res["diff"] == 0.5
    never = paired_bootstrap(lambda i: float("nan"), lambda i: 0.0, plan, 10)
    assert np.isnan(never["low"]) and verdict(never) == "tie"


def test_harrell_c_matches_scikit_survival_with_ties_and_resampled_duplicates():
    from sksurv.metrics import concordance_index_censored

    from mmkd.evaluation.stats import harrell_c

    rng = np.random.default_rng(4)
    time = np.round(rng.exponential(10, 120))  # rounded: tied times, events and censorings among them
    event = rng.random(120) < 0.6
    risk = np.round(rng.normal(size=120), 1)  # tied risks
    assert harrell_c(time, event, risk) == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-12)
    for idx in resample_plan(120, seed=1, resamples=5):  # a patient drawn twice ties with itself: not comparable
        ref = concordance_index_censored(event[idx], time[idx], risk[idx])[0]
        assert harrell_c(time[idx], event[idx], risk[idx]) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="comparable"):
        harrell_c(time, np.zeros(120, bool), risk)


def test_an_identical_model_ties_and_the_mean_gain_resamples_every_set_at_once():
    from mmkd.evaluation.paired import PairedTests
    from mmkd.evaluation.stats import Outcome

    rng = np.random.default_rng(5)
    sets = {}
    for name, n, p_a, p_b in (("s1", 60, 0.8, 0.6), ("s2", 90, 0.7, 0.7)):
        y = np.arange(n) % 3
        sets[name] = {m: Outcome("mean", {"values": (rng.random(n) < p).astype(float)}, strata=y)
                      for m, p in (("a", p_a), ("b", p_b))}
    outcomes = {m: {s: {"acc": sets[s][m]} for s in sets} for m in ("a", "b")}
    tests = PairedTests(outcomes, seed=9, resamples=300)
    same = tests.compare("a", "a", "s1", "acc")
    assert (same["diff"], same["low"], same["high"], same["verdict"]) == (0.0, 0.0, 0.0, "tie")
    g = tests.mean_gain("a", "b", [("s1", "acc"), ("s2", "acc")])
    # by hand: resample r of s1 and resample r of s2 (each from its own plan) give one resample of the mean
    plans = {s: sets[s]["a"].plan(9, 300) for s in sets}
    per_r = [np.mean([sets[s]["a"].value(plans[s][r]) - sets[s]["b"].value(plans[s][r]) for s in sets])
             for r in range(300)]
    assert g["diff"] == pytest.approx(np.mean([sets[s]["a"].value() - sets[s]["b"].value() for s in sets]))
    assert (g["low"], g["high"]) == pytest.approx(tuple(np.percentile(per_r, [2.5, 97.5])))
    assert g["n_sets"] == 2


def test_midranks_equal_scipys_average_ranks_with_ties():
    from scipy.stats import rankdata

    from mmkd.evaluation.stats import midranks

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        for x in (rng.normal(size=n), rng.integers(0, 4, n).astype(float), np.round(rng.random(n), 1)):
            np.testing.assert_array_equal(midranks(x), rankdata(x))
