"""Owns the evaluation's statistics: stratified bootstrap confidence intervals and means over held-out sets."""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
CI_SUFFIXES = ("_ci_low", "_ci_high")


def bootstrap_accuracy_ci(correct: np.ndarray, y: np.ndarray, seed: int, resamples: int = RESAMPLES,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of accuracy from a stratified bootstrap: each resample draws, within every class, as many
    items as the class has, with replacement (class sizes stay fixed, as the reference's bootstrap does)."""
    correct = np.asarray(correct, dtype=np.float64)
    y = np.asarray(y)
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    hits = np.zeros(resamples)
    for c in np.unique(y):
        members = correct[y == c]
        hits += members[rng.integers(0, len(members), (resamples, len(members)))].sum(1)
    acc = hits / len(correct)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(acc, [tail, 100 - tail])
    return float(low), float(high)


def mean_over_sets(per_set: dict[str, dict[str, float]], skip: tuple[str, ...] = ("n_test", "in_domain")) -> dict:
    """Each metric averaged over the sets that report it, and `<metric>_n_sets`: how many sets that is.

    The union of every set's metric names: a metric one set cannot report (AUC with a class absent, the probe
    without a probe split) is averaged over the others, never dropped from the mean, and the count says so.
    Confidence bounds are per set and are not averaged."""
    names = sorted({k for m in per_set.values() for k in m if k not in skip and not k.endswith(CI_SUFFIXES)})
    out: dict[str, float] = {}
    for k in names:
        values = [m[k] for m in per_set.values() if k in m]
        out[k] = float(np.mean(values))
        out[f"{k}_n_sets"] = len(values)
    return out


def bootstrap_ci(statistic, arrays: tuple[np.ndarray, ...], strata: np.ndarray | None, seed: int,
                 resamples: int = RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of any statistic(*arrays) over items, from a bootstrap stratified by `strata` (class sizes
    stay fixed; None: plain). Resamples where the statistic is undefined (it raises ValueError or returns NaN,
    e.g. an AUC drawing one class only) are left out; with fewer than half of them defined, the CI is NaN."""
    n = len(arrays[0])
    if n == 0:
        return float("nan"), float("nan")
    strata = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    values = []
    for _ in range(resamples):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        try:
            v = float(statistic(*(a[idx] for a in arrays)))
        except ValueError:
            continue
        if np.isfinite(v):
            values.append(v)
    if len(values) < resamples / 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def fold_spread_ci(fold_values: list[float], level: float = 0.95) -> tuple[float, float]:
    """CI of a cross-validated mean from the spread of its folds: mean +- t(k-1) * sd / sqrt(k)."""
    from scipy import stats as st

    v = np.asarray([x for x in fold_values if np.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    half = float(st.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return float(v.mean() - half), float(v.mean() + half)
