"""Owns the linear probe: logistic regression on frozen embeddings, C chosen on val, at data fractions and k-shot."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from mmkd.evaluation.stats import Outcome, plan_ci, resample_plan
from mmkd.evaluation.tasks import BOOTSTRAP_SEED
from mmkd.evaluation.tasks.zeroshot import BY_CLASS, balanced_accuracy, column_aucs, label_strata, multilabel_outcome

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


def _fits(train_x, train_y, val_x, val_y, test_x, n_classes: int, seeds: list[int], fractions, k_shots,
          c_grid) -> dict[str, list[tuple[np.ndarray, float]]]:
    """prefix -> [(test scores, chosen C)] per head seed. A seed draws its own subsets (and CV folds without a
    val split); with a val split the fit on a given subset is deterministic (lbfgs), so a subset every seed
    shares (100% of train) is fitted once and its result repeated."""
    fitted: dict[bytes, tuple[np.ndarray, float]] = {}
    out: dict[str, list[tuple[np.ndarray, float]]] = {}
    has_val = val_x is not None and len(val_x) > 0
    for s in seeds:
        for prefix, idx in subsets(train_y, s, fractions, k_shots):
            key = idx.tobytes()
            if not has_val or key not in fitted:
                with threadpool_limits(1, user_api="blas"):  # matrices this small only lose to threads (10x)
                    probe, c = _select(train_x[idx], train_y[idx], val_x, val_y, n_classes, s, c_grid)
                    fitted[key] = (probe.scores(test_x, n_classes), c)
            out.setdefault(prefix, []).append(fitted[key])
    return out


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, n_classes: int, seed: int,
                 fractions=(0.01, 0.1, 1.0), k_shots=(1, 4, 16), c_grid=(0.01, 0.1, 1, 10, 100), head_seeds: int = 1,
                 outcomes: dict | None = None) -> dict:
    """Probe metrics on test at each train fraction and k-shot, each the mean over `head_seeds` seeds (seed,
    seed+1, ...): acc1 with CI (multilabel: macro AUC with CI); at 100% also balanced accuracy with CI and the
    chosen C (probe_c, the median over seeds). CIs: a bootstrap of the test items stratified by class, of the
    seed-mean. outcomes: filled with the headline's Outcome (the per-item mean over seeds), for paired tests."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y).astype(int), np.asarray(test_y).astype(int)
    val_x = None if val_x is None else np.asarray(val_x, np.float64)
    val_y = None if val_y is None else np.asarray(val_y).astype(int)
    seeds = [seed + k for k in range(max(1, head_seeds))]
    fits = _fits(train_x, train_y, val_x, val_y, test_x, n_classes, seeds, fractions, k_shots, c_grid)
    plan = None if test_y.ndim == 2 else resample_plan(len(test_y), BOOTSTRAP_SEED, strata=test_y)
    out: dict = {}
    for prefix, runs in fits.items():
        scores = np.stack([r[0] for r in runs])  # (seeds, n, C)
        if test_y.ndim == 2:
            outcome = multilabel_outcome(scores, test_y)
            outcome.with_ci(f"{prefix}_auc_macro", outcome.plan(BOOTSTRAP_SEED), out)
            name = f"{prefix}_auc_macro"
        else:
            preds = scores.argmax(2)
            outcome = Outcome("mean", {"values": (preds == test_y).mean(0)}, strata=test_y, design=BY_CLASS)
            outcome.with_ci(f"{prefix}_acc1", plan, out)
            name = f"{prefix}_acc1"
            if prefix == "probe":
                def bal(i, preds=preds):
                    return float(np.mean([balanced_accuracy(test_y[i], p[i]) for p in preds]))
                out["probe_balanced_acc"] = bal(np.arange(len(test_y)))
                out["probe_balanced_acc_ci_low"], out["probe_balanced_acc_ci_high"] = plan_ci(bal, plan)
        if prefix == "probe":
            out["probe_c"] = float(np.median([r[1] for r in runs]))
            if outcomes is not None:
                outcomes[name] = outcome
    return out
