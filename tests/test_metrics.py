"""Code tests: evaluation metrics against hand-computed cases."""

import numpy as np
import pytest

from mmkd.evaluation.metrics import class_embeddings, linear_probe, retrieval, zero_shot


def test_retrieval_ranks():
    img = np.eye(4)
    txt = np.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 swapped: their positives rank second
    r = retrieval(img, txt, [1, 2])
    assert r["i2t_r1"] == 0.5 and r["i2t_r2"] == 1.0 and r["t2i_r1"] == 0.5
    assert r["i2t_median_rank"] == 1.5 and r["i2t_mean_rank"] == 1.5


def test_zero_shot_metrics():
    cls = class_embeddings([np.array([[1.0, 0.0], [0.9, 0.1]]), np.array([[0.0, 1.0]])])
    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.98], [1.0, 0.1]])
    m = zero_shot(img, cls, np.array([0, 1, 0, 0]))
    assert m["zeroshot_acc1"] == 0.75
    assert m["zeroshot_mean_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert 0 <= m["zeroshot_auc_macro"] <= 1


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (30, 4)) + i for i in range(3)])
    y = np.repeat([0, 1, 2], 30)
    m = linear_probe(x, y, x, y, 3, 1.0, 0)
    assert m["probe_acc1"] == 1.0 and m["probe_mean_recall"] == 1.0


def test_missing_task_label_names_the_record():
    from mmkd.evaluation.evaluate import EvaluationDataError, task_labels

    task = {"classes": ["normal", "tumor"], "label": "finding"}
    recs = [{"id": "a", "split": "test", "labels": {"finding": "tumor"}},
            {"id": "b", "split": "test", "labels": {}}]
    assert task_labels(recs[:1], np.array([True]), task, "mri").tolist() == [1]
    with pytest.raises(EvaluationDataError, match=r"record 'b' \(test\): label 'finding'=None"):
        task_labels(recs, np.array([True, True]), task, "mri")


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
