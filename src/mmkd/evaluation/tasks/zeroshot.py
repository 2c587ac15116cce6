"""Owns zero-shot classification from prompt ensembles: accuracy, balanced accuracy, AUC, F1 (and mAP multilabel)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, f1_score

from mmkd.evaluation.stats import Outcome, plan_ci, resample_plan
from mmkd.evaluation.tasks import BOOTSTRAP_SEED

BY_CLASS = "items, stratified by class"
BY_LABELS = "items, stratified by rarest label"


def class_embeddings(class_prompt_emb: list[np.ndarray]) -> np.ndarray:
    """One unit vector per class: its prompts normalised, averaged, re-normalised (CLIP_benchmark's ensemble)."""
    means = []
    for e in class_prompt_emb:
        e = np.asarray(e, dtype=np.float64).reshape(-1, np.shape(e)[-1])
        means.append((e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0))
    means = np.stack(means)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in y: sklearn's balanced_accuracy_score, CLIP_benchmark's
    mean_per_class_recall; written with bincount because the bootstrap calls it a thousand times."""
    n = int(max(y.max(), pred.max())) + 1
    counts = np.bincount(y, minlength=n)
    hits = np.bincount(y, weights=(pred == y), minlength=n)
    present = counts > 0
    return float((hits[present] / counts[present]).mean())


def dense_ranks(scores: np.ndarray) -> np.ndarray:
    """Each column's values replaced by their 0-based dense rank (ties share one): all an AUC needs of them."""
    return rankdata(scores, method="dense", axis=0).astype(np.int64) - 1


def rank_aucs(ranks: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """ROC AUC per column from dense ranks (Mann-Whitney with mid-ranks, so ties count one half as in sklearn);
    NaN for a column whose truth is all one value. Counting instead of sorting: a bootstrap resamples the rank
    rows and calls this a thousand times."""
    truth = truth.astype(bool)
    n, c = ranks.shape
    k = int(ranks.max()) + 1
    count = np.bincount((ranks + np.arange(c) * k).ravel(), minlength=c * k).reshape(c, k)
    midrank = np.cumsum(count, axis=1) - (count - 1) / 2  # of the items sharing each rank, in 1..n
    pos = truth.sum(0)
    neg = n - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((midrank[np.arange(c), ranks] * truth).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def column_aucs(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """ROC AUC of every column of scores against the 0/1 column of truth; NaN where truth has one value."""
    return rank_aucs(dense_ranks(scores), truth)


def softmax_log_odds(logits: np.ndarray) -> np.ndarray:
    """log(p_c / (1 - p_c)) of the softmax: it ranks items exactly as p_c does, without the ties that exp(100 *
    cosine) underflowing to 0 (or log-softmax rounding to 0) would put among confident items."""
    c = logits.shape[1]
    others = np.where(np.eye(c, dtype=bool), -np.inf, logits[:, None, :])
    return logits - np.logaddexp.reduce(others, axis=2)


def label_strata(labels: np.ndarray) -> np.ndarray:
    """A bootstrap/sampling stratum per multilabel row: its rarest positive class, or C for no finding, so every
    class that is some row's rarest keeps its positives when class sizes are held fixed."""
    labels = np.asarray(labels).astype(bool)
    freq = labels.sum(0)
    rarity = np.where(labels, freq[None, :], np.iinfo(np.int64).max)
    return np.where(labels.any(1), rarity.argmin(1), labels.shape[1])


def multilabel_outcome(scores: np.ndarray, labels: np.ndarray) -> Outcome:
    """Macro AUC over the classes having both values, as an Outcome: scores (seeds, n, C) or (n, C), resampled
    by a bootstrap stratified by label_strata; a resample where one of those classes loses its positives or
    negatives is left out (NaN)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[None] if scores.ndim == 2 else scores
    return Outcome("auc_multilabel", {"scores": scores, "labels": np.asarray(labels).astype(int)},
                   strata=label_strata(labels), design=BY_LABELS)


def zero_shot(image_emb: np.ndarray, class_prompt_emb: list[np.ndarray], labels, multilabel: bool = False,
              outcomes: dict | None = None) -> dict:
    """Zero-shot metrics of images against class prompt ensembles; labels (n,) class index, or (n,C) 0/1.
    outcomes: filled with the per-item Outcome of each headline metric (acc1, macro AUC), for paired tests."""
    logits = 100.0 * np.asarray(image_emb, dtype=np.float64) @ class_embeddings(class_prompt_emb).T
    found: dict[str, Outcome] = {}
    if multilabel:
        out = _multilabel(logits, np.asarray(labels).astype(int), found)
    else:
        out = _single_label(logits, np.asarray(labels).astype(int), found)
    if outcomes is not None:
        outcomes.update(found)
    return out


def _single_label(logits: np.ndarray, y: np.ndarray, found: dict) -> dict:
    n_classes = logits.shape[1]
    pred = logits.argmax(1)
    plan = resample_plan(len(y), BOOTSTRAP_SEED, strata=y)  # class sizes fixed, as the reference's bootstrap
    out: dict = {}
    found["zeroshot_acc1"] = Outcome("mean", {"values": (pred == y).astype(float)}, strata=y, design=BY_CLASS)
    found["zeroshot_acc1"].with_ci("zeroshot_acc1", plan, out)
    out["zeroshot_balanced_acc"] = balanced_accuracy(y, pred)
    out["zeroshot_balanced_acc_ci_low"], out["zeroshot_balanced_acc_ci_high"] = plan_ci(
        lambda i: balanced_accuracy(y[i], pred[i]), plan)
    if n_classes > 1 and len(np.unique(y)) == n_classes:  # AUC is undefined with a class absent
        ranks = dense_ranks(softmax_log_odds(logits))
        found["zeroshot_auc_macro"] = Outcome("auc", {"scores": ranks[None], "labels": y}, strata=y, design=BY_CLASS)
        found["zeroshot_auc_macro"].with_ci("zeroshot_auc_macro", plan, out)
    out["zeroshot_f1_macro"] = float(f1_score(y, pred, average="macro", zero_division=0))
    return out


def _multilabel(logits: np.ndarray, labels: np.ndarray, found: dict) -> dict:
    """AUC and AP per class from the raw logits; F1 from the decision "the class's logit beats the mean logit of
    the other classes" (scale-free, needs no threshold fitted on labels; every image gets at least its top
    class, so an all-negative image always costs a false positive)."""
    has_pos = labels.max(0) == 1
    out: dict = {}
    if ((labels.min(0) == 0) & has_pos).any():
        auc = found["zeroshot_auc_macro"] = multilabel_outcome(logits, labels)
        auc.with_ci("zeroshot_auc_macro", auc.plan(BOOTSTRAP_SEED), out)
    if has_pos.any():
        c = logits.shape[1]
        others = (logits.sum(1, keepdims=True) - logits) / max(c - 1, 1)
        pred = (logits > others).astype(int)
        cols = np.flatnonzero(has_pos)  # F1 and AP are undefined for a class with no positives
        out["zeroshot_f1_macro"] = float(f1_score(labels[:, cols], pred[:, cols], average="macro", zero_division=0))
        out["zeroshot_map"] = float(np.mean([average_precision_score(labels[:, k], logits[:, k]) for k in cols]))
    return out
