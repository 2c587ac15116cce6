"""Zero-shot, linear-probe and retrieval tasks: hand-checked answers, chance levels, ties, CI coverage, and
agreement with CLIP_benchmark's metric definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mmkd.evaluation.tasks.probe import linear_probe, subsets
from mmkd.evaluation.tasks.retrieval import retrieval
from mmkd.evaluation.tasks.zeroshot import (class_embeddings, column_aucs, dense_ranks, rank_aucs,
                                            softmax_log_odds, zero_shot)


def unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def clustered(rng, n: int, n_classes: int, dim: int, noise: float):
    """Items around orthogonal class centres: (embeddings float32, labels)."""
    y = np.arange(n) % n_classes
    return unit(np.eye(dim)[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


def prompts_for(centres: np.ndarray, rng, per_class: int = 3, noise: float = 0.05) -> list[np.ndarray]:
    return [unit(c + noise * rng.normal(size=(per_class, len(c)))).astype(np.float32) for c in centres]


# ---------------------------------------------------------------- zero-shot

def test_zero_shot_perfect_embeddings():
    rng = np.random.default_rng(0)
    img, y = clustered(rng, 40, 4, 16, 0.0)
    m = zero_shot(img, [np.eye(16)[[c]] for c in range(4)], y)
    for k in ("zeroshot_acc1", "zeroshot_balanced_acc", "zeroshot_auc_macro"):
        assert (m[k], m[f"{k}_ci_low"], m[f"{k}_ci_high"]) == (1.0, 1.0, 1.0)
    assert m["zeroshot_f1_macro"] == 1.0


def test_zero_shot_random_embeddings_score_chance():
    rng = np.random.default_rng(1)
    n, c = 4000, 4
    img = unit(rng.normal(size=(n, 32))).astype(np.float32)
    m = zero_shot(img, [unit(rng.normal(size=(3, 32))) for _ in range(c)], rng.integers(0, c, n))
    assert abs(m["zeroshot_acc1"] - 0.25) < 0.035  # sd 0.007
    assert abs(m["zeroshot_auc_macro"] - 0.5) < 0.04
    assert m["zeroshot_acc1_ci_low"] < m["zeroshot_acc1"] < m["zeroshot_acc1_ci_high"]


def test_zero_shot_matches_clip_benchmark_definition():
    """CLIP_benchmark (metrics/zeroshot_classification.py): each prompt embedding normalised, averaged over the
    templates and re-normalised; logits = 100 * image @ weights; acc1 = top-1 hit rate; mean_per_class_recall
    = sklearn's balanced_accuracy_score(target, argmax)."""
    rng = np.random.default_rng(2)
    img, y = clustered(rng, 300, 5, 24, 0.6)
    y = np.where(rng.random(300) < 0.3, 0, y)  # imbalanced, so balanced accuracy differs from accuracy
    prompts = [rng.normal(size=(4, 24)) + 2 * np.eye(24)[c] for c in range(5)]  # not normalised on purpose
    weights = np.stack([unit(unit(p).mean(0)) for p in prompts], 1)
    logits = 100.0 * img.astype(np.float64) @ weights
    pred = logits.argmax(1)
    m = zero_shot(img, prompts, y)
    assert m["zeroshot_acc1"] == pytest.approx(float((pred == y).mean()))
    assert m["zeroshot_balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["zeroshot_acc1"] != pytest.approx(m["zeroshot_balanced_acc"])
    # one-vs-rest macro AUC of the softmax p_c, ranked by its log-odds: p_c itself saturates at 0 and 1 in
    # float64 at CLIP's logit scale, which would add ties
    log_odds = np.stack([logits[:, c] - logsumexp(np.delete(logits, c, 1), axis=1) for c in range(5)], 1)
    assert m["zeroshot_auc_macro"] == pytest.approx(
        np.mean([roc_auc_score(y == c, log_odds[:, c]) for c in range(5)]))


def test_zero_shot_binary_auc_and_absent_class():
    rng = np.random.default_rng(3)
    img, y = clustered(rng, 200, 2, 8, 0.8)
    prompts = [np.eye(8)[[0]], np.eye(8)[[1]]]
    logits = 100.0 * img.astype(np.float64) @ np.eye(8)[:2].T
    assert zero_shot(img, prompts, y)["zeroshot_auc_macro"] == pytest.approx(
        roc_auc_score(y, logits[:, 1] - logits[:, 0]))
    three = prompts + [np.eye(8)[[2]]]  # a third class nobody has: AUC undefined, the rest still reported
    m = zero_shot(img, three, y)
    assert "zeroshot_auc_macro" not in m and "zeroshot_acc1" in m


def test_column_aucs_match_sklearn_with_ties():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=(60, 3)).astype(float)  # many ties
    truth = rng.random((60, 3)) < 0.4
    expected = [roc_auc_score(truth[:, k], scores[:, k]) for k in range(3)]
    np.testing.assert_allclose(column_aucs(scores, truth), expected)
    # the bootstrap's path: ranks taken once, then rows resampled (duplicates, gaps in the ranks)
    scores = rng.normal(size=(60, 3)).round(1)
    idx = rng.integers(0, 60, 60)
    expected = [roc_auc_score(truth[idx, k], scores[idx, k]) for k in range(3)]
    np.testing.assert_allclose(rank_aucs(dense_ranks(scores)[idx], truth[idx]), expected)


def test_zero_shot_multilabel_hand_made():
    """Class k's prompts average to axis k; class 3 has no positives (left out of every macro average).
    Logits (x100): img0 (.71,.71,0,0) img1 (0,0,1,0) img2 (1,0,0,0) img3 (.6,.8,0,0). Rule: positive when the
    class logit beats the mean of the other three. Predictions [1100],[0010],[1000],[1100] against labels
    [1100],[0010],[1010],[0100]: F1 class0 = 4/5, class1 = 1, class2 = 2/3 -> 0.8222. AUC class0 = class1 = 1,
    class2: positives {100, 0} against negatives {0, 0} -> (2 + 2 * 0.5) / 4 = 0.75 -> 0.9167. AP class2: 0.75."""
    e = np.eye(4)
    prompts = [unit([e[k] + 0.1 * e[(k + 1) % 4], e[k] - 0.1 * e[(k + 1) % 4]]) for k in range(4)]
    img = unit([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0.6, 0.8, 0, 0]])
    labels = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 0]])
    m = zero_shot(img, prompts, labels, multilabel=True)
    assert "zeroshot_acc1" not in m
    assert m["zeroshot_f1_macro"] == pytest.approx((0.8 + 1 + 2 / 3) / 3)
    assert m["zeroshot_auc_macro"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["zeroshot_map"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["zeroshot_auc_macro_ci_low"] <= m["zeroshot_auc_macro"] <= m["zeroshot_auc_macro_ci_high"]


# ---------------------------------------------------------------- retrieval

def reference_recall_at_k(scores: np.ndarray, positive_pairs: np.ndarray, k: int) -> float:
    """CLIP_benchmark's definition (metrics/zeroshot_retrieval.py): per query row the k best-scoring columns;
    the query counts when any of them is a positive pair; averaged over queries."""
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(positive_pairs, topk, 1).any(1).mean())


def test_retrieval_matches_clip_benchmark_without_ties():
    rng = np.random.default_rng(5)
    img = unit(rng.normal(size=(300, 32))).astype(np.float32)
    txt = unit(img + 0.5 * rng.normal(size=(300, 32))).astype(np.float32)
    m = retrieval(img, txt, None)
    scores = txt.astype(np.float64) @ img.astype(np.float64).T  # texts x images, as CLIP_benchmark builds it
    pairs = np.eye(300, dtype=bool)
    for k in (1, 5, 10):
        assert m[f"t2i_r{k}"] == reference_recall_at_k(scores, pairs, k)  # their image_retrieval_recall@k
        assert m[f"i2t_r{k}"] == reference_recall_at_k(scores.T, pairs, k)  # their text_retrieval_recall@k
    assert 0.1 < m["i2t_r1"] < m["i2t_r10"] < 1.0  # a case where the comparison means something


def test_retrieval_perfect_and_random():
    rng = np.random.default_rng(6)
    emb = unit(rng.normal(size=(200, 64))).astype(np.float32)
    m = retrieval(emb, emb)
    assert (m["i2t_r1"], m["i2t_r1_ci_low"], m["i2t_r1_ci_high"]) == (1.0, 1.0, 1.0)
    assert (m["t2i_r1"], m["t2i_median_rank"], m["t2i_mean_rank"]) == (1.0, 1.0, 1.0)
    m = retrieval(emb, unit(rng.normal(size=(200, 64))).astype(np.float32))
    assert m["i2t_r10"] < 0.15 and m["t2i_r10"] < 0.15  # chance: 0.05
    assert abs(m["i2t_mean_rank"] - 100.5) < 15  # uniform rank over 200: mean 100.5, sd of the mean ~4


def test_retrieval_ties_count_against():
    """Images e0, e1; texts e0, e0. i2t: img0 ties its text with text1 (rank 2), img1 scores 0 everywhere (rank 2).
    t2i: text0 finds img0 first (rank 1); text1 prefers img0 (rank 2)."""
    e = np.eye(2, dtype=np.float32)
    m = retrieval(e, e[[0, 0]], ks=(1, 2))
    assert (m["i2t_r1"], m["i2t_r2"], m["i2t_median_rank"]) == (0.0, 1.0, 2.0)
    assert (m["t2i_r1"], m["t2i_mean_rank"]) == (0.5, 1.5)


def test_retrieval_with_duplicate_captions_by_hand():
    """Five images, three distinct captions (A for images 0, 1, 4; B for 2; C for 3); caption texts e0, e1, e2.
    Similarities (image . caption): i0 = e0 -> (1, 0, 0); i1 = .6 e0 + .8 e1 -> (.6, .8, 0); i2 = e1 -> (0, 1, 0);
    i3 = .8 e0 + .6 e2 -> (.8, 0, .6); i4 = e2 -> (0, 0, 1).
    i2t, gallery {A, B, C} once each: ranks of the own caption i0 1, i1 2 (B .8 > A .6), i2 1, i3 2 (A .8 > C .6),
    i4 3 (A scores 0: B ties it, C beats it) -> R@1 2/5, mean rank 9/5.
    t2i, three queries (not five): A's positives {i0, i1, i4}, best i0 (1.0) -> rank 1; B: i2 (1.0) > i1 (.8) ->
    1; C: i3 (.6) < i4 (1.0), a negative for C -> rank 2. R@1 2/3, mean rank 4/3."""
    e = np.eye(3, dtype=np.float32)
    img = np.stack([e[0], 0.6 * e[0] + 0.8 * e[1], e[1], 0.8 * e[0] + 0.6 * e[2], e[2]])
    captions = np.array(["A", "A", "B", "C", "A"])
    txt = e[[0, 0, 1, 2, 0]]  # one text embedding per item: identical captions, identical rows
    found: dict = {}
    m = retrieval(img, txt, captions, ks=(1, 2), outcomes=found)
    assert m["i2t_r1"] == pytest.approx(2 / 5) and m["i2t_mean_rank"] == pytest.approx(9 / 5)
    assert m["i2t_r2"] == pytest.approx(4 / 5) and m["i2t_median_rank"] == 2.0
    assert m["t2i_r1"] == pytest.approx(2 / 3) and m["t2i_mean_rank"] == pytest.approx(4 / 3)
    assert m["t2i_r2"] == 1.0
    i2t, t2i = found["i2t_r1"], found["t2i_r1"]
    assert np.array_equal(i2t.data["values"], [1, 0, 1, 0, 0]) and np.array_equal(i2t.clusters, [0, 0, 1, 2, 0])
    assert np.array_equal(t2i.data["values"], [1, 1, 0]) and t2i.n == 3
    for idx in i2t.plan(42, resamples=50):  # the bootstrap draws caption groups: A's three images together
        counts = np.bincount(idx, minlength=5)
        assert counts[0] == counts[1] == counts[4] and len(idx) == 3 * counts[0] + counts[2] + counts[3]


def test_retrieval_groups_make_duplicates_positive():
    """Items 0 and 1 have the same caption: without groups each image ties its caption with the duplicate."""
    rng = np.random.default_rng(7)
    img = unit(rng.normal(size=(6, 16))).astype(np.float32)
    txt = img.copy()
    txt[1] = txt[0]
    img[1] = unit(img[0] + 0.3 * img[1])
    plain = retrieval(img, txt, None)
    grouped = retrieval(img, txt, np.array([0, 0, 1, 2, 3, 4]))
    assert plain["i2t_r1"] < 1.0 and plain["t2i_r1"] < 1.0
    assert grouped["i2t_r1"] == 1.0 and grouped["t2i_r1"] == 1.0


def test_retrieval_ci_coverage():
    """200 simulated sets of 100 queries, each a hit with probability 0.7 (hit: its text is its own image,
    miss: its text is orthogonal to every image, so all scores tie at 0): the 95% CI should hold 0.7 about 95%
    of the time (the percentile bootstrap runs slightly narrow at n=100)."""
    rng = np.random.default_rng(8)
    n, p, covered = 100, 0.7, 0
    basis = np.eye(2 * n, dtype=np.float32)
    for _ in range(200):
        hit = rng.random(n) < p
        txt = np.where(hit[:, None], basis[:n], basis[n:])
        m = retrieval(basis[:n], txt, None, ks=(1,))
        assert m["i2t_r1"] == hit.mean()
        covered += m["i2t_r1_ci_low"] <= p <= m["i2t_r1_ci_high"]
    assert 0.89 <= covered / 200 <= 0.99


# ---------------------------------------------------------------- linear probe

def test_probe_subsets_draw_every_class_and_repeat():
    y = np.repeat(np.arange(4), [200, 30, 5, 1])
    drawn = dict(subsets(y, 0, (0.01, 0.1, 1.0), (1, 4, 16)))
    assert set(drawn) == {"probe_p1", "probe_p10", "probe", "probe_k1", "probe_k4", "probe_k16"}
    for idx in drawn.values():
        assert set(y[idx]) == {0, 1, 2, 3} and len(np.unique(idx)) == len(idx)
    assert np.bincount(y[drawn["probe_p1"]]).tolist() == [2, 1, 1, 1]
    assert np.bincount(y[drawn["probe_p10"]]).tolist() == [20, 3, 1, 1]
    assert np.bincount(y[drawn["probe_k16"]]).tolist() == [16, 16, 5, 1]
    assert len(drawn["probe"]) == len(y)
    again = dict(subsets(y, 0, (0.01,), ()))
    other = dict(subsets(y, 1, (0.1,), ()))
    assert np.array_equal(again["probe_p1"], drawn["probe_p1"])
    assert not np.array_equal(other["probe_p10"], drawn["probe_p10"])


def test_probe_perfect_embeddings_and_c_tie_rule():
    """Separable clusters: every C scores 1 on val, so the tie goes to the smallest C; every metric is 1."""
    rng = np.random.default_rng(9)
    m = linear_probe(*clustered(rng, 60, 3, 32, 0.05), *clustered(rng, 30, 3, 32, 0.05),
                     *clustered(rng, 90, 3, 32, 0.05), 3, seed=0)
    assert m["probe_c"] == 0.01
    for k in ("probe_acc1", "probe_balanced_acc", "probe_p1_acc1", "probe_k1_acc1", "probe_k16_acc1"):
        assert (m[k], m[f"{k}_ci_low"], m[f"{k}_ci_high"]) == (1.0, 1.0, 1.0)


def test_probe_chooses_c_on_val():
    """Imbalanced train (90:10) with features dwarfed by a shared offset: only the weakest penalty (C=100) finds
    the minority class (smaller C: balanced accuracy 0.5 on val, checked by hand), with val or by 3-fold CV."""
    rng = np.random.default_rng(10)

    def make(sizes):
        y = np.repeat([0, 1], sizes)
        return unit(np.eye(64)[y] + rng.normal(size=(len(y), 64)) * 0.05 + 1).astype(np.float32), y

    train, val, test = make([90, 10]), make([30, 30]), make([100, 100])
    grid = (0.01, 1, 100)
    m = linear_probe(*train, *val, *test, 2, seed=0, c_grid=grid)
    assert m["probe_c"] == 100 and m["probe_balanced_acc"] > 0.9
    no_val = linear_probe(*train, None, None, *test, 2, seed=0, c_grid=grid)
    assert no_val["probe_c"] == 100 and no_val["probe_balanced_acc"] > 0.9


def test_probe_random_labels_score_chance():
    rng = np.random.default_rng(11)
    x = unit(rng.normal(size=(1400, 32))).astype(np.float32)
    y = rng.integers(0, 2, 1400)
    m = linear_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:], 2, seed=0, k_shots=())
    assert abs(m["probe_acc1"] - 0.5) < 0.06  # sd 0.016


def test_probe_over_head_seeds_is_the_mean_and_its_outcome_the_per_item_mean():
    """Three seeds: each fraction's subsets differ per seed; the value is the mean of the single-seed values, the
    per-item outcome the mean of each seed's correctness, and the deterministic 100% fit is the same for all."""
    rng = np.random.default_rng(11)
    tr, va, te = clustered(rng, 120, 3, 16, 0.9), clustered(rng, 30, 3, 16, 0.9), clustered(rng, 150, 3, 16, 0.9)
    kw = dict(fractions=(0.1, 1.0), k_shots=(1,), c_grid=(0.1, 1.0))
    found: dict = {}
    many = linear_probe(*tr, *va, *te, 3, seed=5, head_seeds=3, outcomes=found, **kw)
    singles = [linear_probe(*tr, *va, *te, 3, seed=s, **kw) for s in (5, 6, 7)]
    for k in ("probe_p10_acc1", "probe_k1_acc1", "probe_acc1", "probe_balanced_acc"):
        assert many[k] == pytest.approx(np.mean([x[k] for x in singles])), k
    assert len({x["probe_k1_acc1"] for x in singles}) > 1  # the seeds matter where there is randomness
    assert len({x["probe_acc1"] for x in singles}) == 1  # ... and not where there is none
    o = found["probe_acc1"]
    assert o.value() == pytest.approx(many["probe_acc1"]) and np.array_equal(o.strata, te[1])
    assert many["probe_acc1_ci_low"] < many["probe_acc1"] < many["probe_acc1_ci_high"]


def test_zero_shot_outcomes_recompute_its_metrics():
    rng = np.random.default_rng(12)
    centres = np.eye(3, 16)
    img, y = clustered(rng, 90, 3, 16, 1.0)
    found: dict = {}
    prompts = prompts_for(centres, rng)
    m = zero_shot(img, prompts, y, outcomes=found)
    assert set(found) == {"zeroshot_acc1", "zeroshot_auc_macro"}
    assert found["zeroshot_acc1"].value() == m["zeroshot_acc1"] and np.array_equal(found["zeroshot_acc1"].strata, y)
    auc = found["zeroshot_auc_macro"]
    assert auc.value() == pytest.approx(m["zeroshot_auc_macro"]) and 0.5 < m["zeroshot_auc_macro"] < 1.0
    logits = 100 * img.astype(np.float64) @ class_embeddings(prompts).T
    odds = softmax_log_odds(logits)  # ranks as the softmax does, without its underflow ties
    for idx in auc.plan(42, resamples=3):  # on a resample too: sklearn's macro one-vs-rest AUC
        ref = np.mean([roc_auc_score(y[idx] == c, odds[idx, c]) for c in range(3)])
        assert auc.value(idx) == pytest.approx(ref, abs=1e-12)


def test_probe_multilabel_one_vs_rest():
    rng = np.random.default_rng(12)

    def make(n):
        y = (rng.random((n, 3)) < 0.4).astype(int)
        return unit(y @ np.eye(16)[:3] + 0.3 * rng.normal(size=(n, 16))).astype(np.float32), y

    m = linear_probe(*make(120), *make(40), *make(200), 3, seed=0)
    assert "probe_acc1" not in m and m["probe_c"] in (0.01, 0.1, 1, 10, 100)
    assert m["probe_auc_macro"] > 0.9
    assert m["probe_auc_macro_ci_low"] <= m["probe_auc_macro"] <= m["probe_auc_macro_ci_high"]
    assert {"probe_p1_auc_macro", "probe_k1_auc_macro", "probe_k16_auc_macro"} <= set(m)
