"""Owns the linear probe: logistic regression on frozen embeddings, C chosen on val, at data fractions and k-shot."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from mmkd.evaluation.stats import bootstrap_accuracy_ci, bootstrap_ci
from mmkd.evaluation.tasks import BOOTSTRAP_SEED
from mmkd.evaluation.tasks.zeroshot import balanced_accuracy, column_aucs, label_strata, multilabel_auc

CV_FOLDS = 3  # C is chosen by this many folds of the train subset when there is no val split


class _Probe:
    """A multinomial logistic regression, or one binary one per class (multilabel one-vs-rest), refit along the
    C grid from the previous C's solution (lbfgs warm start: the grid costs little more than one fit)."""

    def __init__(self, y: np.ndarray, seed: int):
        self.multilabel = y.ndim == 2
        self.targets = list(y.T) if self.multilabel else [y]
        self.models = [LogisticRegression(max_iter=1000, warm_start=True, random_state=seed)
                       if len(np.unique(t)) > 1 else None for t in self.targets]
        self.const = [float(np.mean(t)) if self.multilabel else int(t[0]) for t in self.targets]

    def fit(self, x: np.ndarray, c: float) -> "_Probe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for m, t in zip(self.models, self.targets):
                if m is not None:
                    m.set_params(C=c).fit(x, t)
        return self

    def scores(self, x: np.ndarray, n_classes: int) -> np.ndarray:
        """(n, C): multilabel, each class's probability; else class probabilities, -1 for classes never seen."""
        if self.multilabel:
            return np.stack([m.predict_proba(x)[:, 1] if m is not None else np.full(len(x), k)
                             for m, k in zip(self.models, self.const)], 1)
        out = np.full((len(x), n_classes), -1.0)
        m = self.models[0]
        if m is None:  # one class in the subset: it is always the answer
            out[:, self.const[0]] = 1.0
        else:
            out[:, m.classes_] = m.predict_proba(x)
        return out


def _score(scores: np.ndarray, y: np.ndarray) -> float:
    """The model-selection score: balanced accuracy, or multilabel macro AUC over the classes having both values."""
    if y.ndim == 2:
        aucs = column_aucs(scores, y)
        return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else 0.0
    return balanced_accuracy(y, scores.argmax(1))


def _select(x, y, val_x, val_y, n_classes: int, seed: int, c_grid) -> tuple[_Probe, float]:
    """The probe fit on (x, y) at the C with the best val score (ties: the smaller C). Without val, the score is
    the mean over CV_FOLDS stratified folds of (x, y); with a class too small to fold, sklearn's default C=1
    (the grid value nearest it)."""
    grid = sorted(float(c) for c in c_grid)
    probe = _Probe(y, seed)
    if val_x is not None and len(val_x):
        scores = [_score(probe.fit(x, c).scores(val_x, n_classes), val_y) for c in grid]
        best = grid[int(np.argmax(scores))]  # argmax takes the first of equal scores: the smaller C
        return probe.fit(x, best), best
    strata = label_strata(y) if y.ndim == 2 else y
    counts = np.bincount(strata)
    folds = min(CV_FOLDS, int(counts[counts > 0].min()))
    if folds < 2:
        best = min(grid, key=lambda c: abs(np.log(c)))
        return probe.fit(x, best), best
    cv_scores = np.zeros(len(grid))
    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, strata):
        fold = _Probe(y[tr], seed)
        cv_scores += [_score(fold.fit(x[tr], c).scores(x[va], n_classes), y[va]) for c in grid]
    best = grid[int(np.argmax(cv_scores))]
    return probe.fit(x, best), best


def _draw(strata: np.ndarray, rng: np.random.Generator, per_stratum) -> np.ndarray:
    """Sorted train indices: per_stratum(size) items of every stratum, drawn without replacement."""
    picks = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        picks.append(rng.choice(members, min(len(members), per_stratum(len(members))), replace=False))
    return np.sort(np.concatenate(picks))


def subsets(train_y: np.ndarray, seed: int, fractions, k_shots) -> list[tuple[str, np.ndarray]]:
    """(metric prefix, train indices) per fraction (stratified, at least one item per class) and per k-shot
    (k items per class, or the whole class when smaller); each draw seeded by seed and its own fraction or k."""
    strata = label_strata(train_y) if train_y.ndim == 2 else train_y
    out = []
    for f in fractions:
        prefix = "probe" if f >= 1 else f"probe_p{f * 100:g}"
        rng = np.random.default_rng([seed, round(f * 1e6)])
        out.append((prefix, np.arange(len(train_y)) if f >= 1 else _draw(strata, rng, lambda m: max(1, round(f * m)))))
    for k in k_shots:
        rng = np.random.default_rng([seed, 10**7 + k])  # apart from every fraction's stream
        out.append((f"probe_k{k}", _draw(strata, rng, lambda m: k)))
    return out


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, n_classes: int, seed: int,
                 fractions=(0.01, 0.1, 1.0), k_shots=(1, 4, 16), c_grid=(0.01, 0.1, 1, 10, 100)) -> dict:
    """Probe metrics on test at each train fraction and k-shot: acc1 with CI (multilabel: macro AUC with CI);
    at 100% also balanced accuracy with CI and the chosen C (probe_c)."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y).astype(int), np.asarray(test_y).astype(int)
    val_x = None if val_x is None else np.asarray(val_x, np.float64)
    val_y = None if val_y is None else np.asarray(val_y).astype(int)
    out: dict = {}
    for prefix, idx in subsets(train_y, seed, fractions, k_shots):
        with threadpool_limits(1, user_api="blas"):  # matrices this small only lose to threads (10x, measured)
            probe, c = _select(train_x[idx], train_y[idx], val_x, val_y, n_classes, seed, c_grid)
            scores = probe.scores(test_x, n_classes)
        if test_y.ndim == 2:
            auc, ci = multilabel_auc(scores, test_y)
            out[f"{prefix}_auc_macro"] = auc
            out[f"{prefix}_auc_macro_ci_low"], out[f"{prefix}_auc_macro_ci_high"] = ci
        else:
            pred = scores.argmax(1)
            out[f"{prefix}_acc1"] = float((pred == test_y).mean())
            out[f"{prefix}_acc1_ci_low"], out[f"{prefix}_acc1_ci_high"] = bootstrap_accuracy_ci(
                pred == test_y, test_y, BOOTSTRAP_SEED)
            if prefix == "probe":
                out["probe_balanced_acc"] = balanced_accuracy(test_y, pred)
                out["probe_balanced_acc_ci_low"], out["probe_balanced_acc_ci_high"] = bootstrap_ci(
                    balanced_accuracy, (test_y, pred), test_y, BOOTSTRAP_SEED)
        if prefix == "probe":
            out["probe_c"] = c
    return out
