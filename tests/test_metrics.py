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
