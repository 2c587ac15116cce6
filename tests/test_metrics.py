"""Code tests: the evaluation statistics (bootstrap CIs, fold spread, means over sets) against known answers."""

import numpy as np
import pytest



def test_bootstrap_ci_covers_the_true_accuracy_about_95_percent_of_the_time():
    """Simulated: 300 held-out sets of 120 items, 3 balanced classes, true accuracy 0.7; the CI of a class-stratified
    resample plan (the plan the tasks and the paired tests share)."""
    from mmkd.evaluation.stats import Outcome

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    covered, widths = 0, []
    for i in range(300):
        acc = Outcome("mean", {"values": (rng.random(120) < 0.7).astype(float)}, strata=y)
        out = acc.with_ci("acc", acc.plan(seed=i, resamples=400), {})
        low, high = out["acc_ci_low"], out["acc_ci_high"]
        covered += low <= 0.7 <= high
        widths.append(high - low)
        assert low <= out["acc"] <= high
    assert 0.90 <= covered / 300 <= 0.99, covered
    assert 0.12 < np.mean(widths) < 0.20  # ~ 2 x 1.96 x sqrt(0.7 x 0.3 / 120) = 0.16


def test_bootstrap_ci_is_fixed_by_its_seed_and_exact_for_a_perfect_model():
    from mmkd.evaluation.stats import plan_ci, resample_plan

    y = np.repeat(np.arange(2), 30)
    correct = (np.arange(60) % 3 > 0).astype(float)

    def ci(values, seed):
        return plan_ci(lambda i: values[i].mean(), resample_plan(60, seed, strata=y))

    assert ci(correct, 7) == ci(correct, 7) and ci(correct, 7) != ci(correct, 8)
    assert ci(np.ones(60), 7) == (1.0, 1.0)


def test_mean_row_uses_every_metric_and_says_how_many_sets_it_covers():
    from mmkd.evaluation.stats import mean_over_sets

    per = {"a": {"zeroshot_acc1": 0.5, "n_test": 10, "zeroshot_acc1_ci_low": 0.4},
           "b": {"zeroshot_acc1": 0.7, "zeroshot_auc_macro": 0.9, "probe_acc1": 0.6},
           "c": {"zeroshot_acc1": 0.9, "zeroshot_auc_macro": 0.7}}
    mean = mean_over_sets(per)
    assert mean["zeroshot_acc1"] == pytest.approx(0.7) and mean["zeroshot_acc1_n_sets"] == 3
    assert mean["zeroshot_auc_macro"] == pytest.approx(0.8) and mean["zeroshot_auc_macro_n_sets"] == 2
    assert mean["probe_acc1"] == pytest.approx(0.6) and mean["probe_acc1_n_sets"] == 1
    assert not any(k.startswith("n_test") or "_ci_" in k for k in mean)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")  # one-class resamples: left out
def test_plan_ci_of_an_auc_and_undefined_resamples():
    from sklearn.metrics import roc_auc_score

    from mmkd.evaluation.stats import plan_ci, resample_plan

    y = np.array([0] * 50 + [1] * 50)
    perfect = y.astype(float)
    by_class = resample_plan(100, 1, strata=y)
    assert plan_ci(lambda i: roc_auc_score(y[i], perfect[i]), by_class) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    noise = rng.random(100)
    low, high = plan_ci(lambda i: roc_auc_score(y[i], noise[i]), by_class)
    assert low < 0.5 < high and high - low < 0.3
    # resamples where the statistic is undefined are left out; undefined on most of them: no CI, not a wrong one
    plain = resample_plan(100, 1)
    one_negative = np.r_[0, np.ones(99)]  # ~63% of plain resamples draw the negative

    def auc(i):
        if len(np.unique(one_negative[i])) < 2:
            raise ValueError("one class")
        return roc_auc_score(one_negative[i], noise[i])

    assert np.isfinite(plan_ci(auc, plain)[0])
    assert np.isnan(plan_ci(lambda i: np.nan if y[i].sum() < 60 else y[i].mean(), plain)[0])
