"""Code tests: the evaluation statistics (bootstrap CIs, fold spread, means over sets) against known answers."""

import numpy as np
import pytest



def test_bootstrap_ci_covers_the_true_accuracy_about_95_percent_of_the_time():
    """Simulated: 300 held-out sets of 120 items, 3 balanced classes, true accuracy 0.7."""
    import numpy as np

    from mmkd.evaluation.stats import bootstrap_accuracy_ci

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    covered, widths = 0, []
    for i in range(300):
        correct = rng.random(120) < 0.7
        low, high = bootstrap_accuracy_ci(correct, y, seed=i, resamples=400)
        covered += low <= 0.7 <= high
        widths.append(high - low)
        assert low <= correct.mean() <= high
    assert 0.90 <= covered / 300 <= 0.99, covered
    assert 0.12 < np.mean(widths) < 0.20  # ~ 2 x 1.96 x sqrt(0.7 x 0.3 / 120) = 0.16


def test_bootstrap_ci_is_fixed_by_its_seed_and_exact_for_a_perfect_model():
    import numpy as np

    from mmkd.evaluation.stats import bootstrap_accuracy_ci

    y = np.repeat(np.arange(2), 30)
    correct = np.arange(60) % 3 > 0
    assert bootstrap_accuracy_ci(correct, y, seed=7) == bootstrap_accuracy_ci(correct, y, seed=7)
    assert bootstrap_accuracy_ci(np.ones(60, bool), y, seed=7) == (1.0, 1.0)


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
def test_generic_bootstrap_and_fold_spread():
    from sklearn.metrics import roc_auc_score

    from mmkd.evaluation.stats import bootstrap_ci, fold_spread_ci

    y = np.array([0] * 50 + [1] * 50)
    perfect = y.astype(float)
    assert bootstrap_ci(roc_auc_score, (y, perfect), y, seed=1) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    low, high = bootstrap_ci(roc_auc_score, (y, rng.random(100)), y, seed=1)
    assert low < 0.5 < high and high - low < 0.3
    # resamples where the statistic is undefined are left out; undefined on most of them: no CI, not a wrong one
    one_negative = (np.r_[0, np.ones(99)], rng.random(100))  # ~63% of plain resamples draw the negative
    assert np.isfinite(bootstrap_ci(roc_auc_score, one_negative, None, seed=1)[0])
    assert np.isnan(bootstrap_ci(lambda a: np.nan if a.sum() < 60 else a.mean(), (y,), None, seed=1)[0])
    low, high = fold_spread_ci([0.70, 0.72, 0.68, 0.71, 0.69])
    assert low < 0.70 < high and high - low == pytest.approx(2 * 2.776 * np.std([0.70, 0.72, 0.68, 0.71, 0.69], ddof=1) / np.sqrt(5), rel=1e-3)
