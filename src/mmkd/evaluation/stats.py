"""Owns the evaluation's statistics: resample plans, per-item outcomes, bootstrap CIs and paired tests, means."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RESAMPLES = 1000
CI_SUFFIXES = ("_ci_low", "_ci_high")


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


def resample_plan(n: int, seed: int, resamples: int = RESAMPLES, clusters: np.ndarray | None = None,
                  strata: np.ndarray | None = None) -> list[np.ndarray]:
    """The item indices of every bootstrap resample, to be shared by the models being compared (a paired test).

    clusters: an id per item; a cluster (an image's questions, a patient's images, the items of one caption) is
    drawn whole, with replacement, so items that are not independent are never counted as if they were. strata:
    an id per item (per cluster: a cluster must not straddle strata); within each stratum as many clusters are
    drawn as it has, so stratum sizes in clusters stay fixed. None: every item its own cluster / one stratum."""
    clusters = np.arange(n) if clusters is None else np.asarray(clusters)
    strata = np.zeros(n, dtype=int) if strata is None else np.asarray(strata)
    if len(clusters) != n or len(strata) != n:
        raise ValueError(f"clusters ({len(clusters)}) and strata ({len(strata)}) must have one id per item ({n})")
    ids, inverse = np.unique(clusters, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # items grouped by cluster, each cluster's in item order
    sizes = np.bincount(inverse, minlength=len(ids))
    starts = np.cumsum(sizes) - sizes
    codes = np.unique(strata, return_inverse=True)[1][order]
    if n:
        low, high = np.minimum.reduceat(codes, starts), np.maximum.reduceat(codes, starts)
        bad = np.flatnonzero(low != high)
        if len(bad):
            k = bad[0]
            spans = sorted(set(strata[order[starts[k]:starts[k] + sizes[k]]].tolist()))
            raise ValueError(f"cluster {ids[k].tolist()!r} straddles strata {spans}")
        cluster_stratum = low
    else:
        cluster_stratum = np.zeros(0, dtype=int)
    rng = np.random.default_rng(seed)
    draws = [g[rng.integers(0, len(g), (resamples, len(g)))] for g in
             (np.flatnonzero(cluster_stratum == s) for s in np.unique(cluster_stratum))]
    drawn = np.concatenate(draws, axis=1) if draws else np.zeros((resamples, 0), dtype=int)  # (resamples, clusters)
    flat = drawn.ravel()
    lengths = sizes[flat]
    ends = np.cumsum(lengths)
    items = order[np.repeat(starts[flat] - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)]
    return np.split(items, np.cumsum(lengths.reshape(resamples, -1).sum(1))[:-1]) if resamples else []


def resample_values(stat, plan: list[np.ndarray]) -> np.ndarray:
    """stat(item indices) on every resample of `plan`; NaN where it is undefined (ValueError or NaN)."""
    out = np.full(len(plan), np.nan)
    for r, idx in enumerate(plan):
        try:
            out[r] = float(stat(idx))
        except ValueError:
            pass
    return out


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values, NaN ones left out; NaN when fewer than half are defined."""
    values = np.asarray(values, dtype=np.float64)
    ok = values[np.isfinite(values)]
    if len(ok) == 0 or len(ok) < len(values) / 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ok, [tail, 100 - tail])
    return float(low), float(high)


def plan_ci(stat, plan: list[np.ndarray], level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of stat(item indices) over the resamples of `plan` (the same plan the paired tests use)."""
    return percentile_ci(resample_values(stat, plan), level)


def paired_from_values(a: float, b: float, values_a: np.ndarray, values_b: np.ndarray, level: float = 0.95) -> dict:
    """The paired result from two models' statistics on the same resamples (see paired_bootstrap)."""
    diffs = np.asarray(values_a, dtype=np.float64) - np.asarray(values_b, dtype=np.float64)
    low, high = percentile_ci(diffs, level)
    return {"diff": float(a) - float(b), "low": low, "high": high, "a": float(a), "b": float(b),
            "resamples": int(np.isfinite(diffs).sum())}


def paired_bootstrap(stat_a, stat_b, plan: list[np.ndarray], n: int, level: float = 0.95) -> dict:
    """The difference stat_a - stat_b over all n items, and its percentile CI over the resamples of `plan`, both
    statistics evaluated on the same resample each time (stat_x: item indices -> value). Resamples where either is
    undefined (ValueError, NaN) are left out; with fewer than half defined the CI is NaN.
    Returns {diff, low, high, a, b, resamples}: the verdict is a win when low > 0, a loss when high < 0."""
    everyone = np.arange(n)
    return paired_from_values(stat_a(everyone), stat_b(everyone), resample_values(stat_a, plan),
                              resample_values(stat_b, plan), level)


def verdict(paired: dict) -> str:
    """win / loss when the paired CI of the difference excludes 0, tie otherwise (or when undefined)."""
    if paired["low"] > 0:
        return "win"
    if paired["high"] < 0:
        return "loss"
    return "tie"


# --- per-item outcomes: what a unit stores so that the report can recompute a metric on any resample ----------

def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing their mean rank (scipy.stats.rankdata's `average`, which costs
    ~85 us a call in wrappers: the report ranks ~36,000 resamples; tests/test_paired_stats.py checks equality)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    dense = np.empty(len(x), dtype=np.int64)
    dense[order] = np.cumsum(first)
    bounds = np.r_[np.flatnonzero(first), len(x)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def _ovr_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary (2 columns): AUC of column 1; else macro one-vs-rest AUC, mid-ranks for ties (sklearn's).
    ValueError when a class is absent (or present alone)."""
    cols = [1] if scores.shape[1] == 2 else range(scores.shape[1])
    aucs = []
    for c in cols:
        auc = _binary_auc(scores[:, c], labels == c)
        if auc is None:
            raise ValueError("AUC undefined: a class is absent")
        aucs.append(auc)
    return float(np.mean(aucs))


def _binary_auc(score: np.ndarray, pos: np.ndarray) -> float | None:
    """Mann-Whitney AUC of `score` for the items `pos` against the rest (mid-ranks for ties); None when either
    side is empty."""
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return None
    return float((midranks(score)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _multilabel_auc(scores: np.ndarray, truth: np.ndarray, cols: np.ndarray) -> float:
    """Macro AUC over `cols`; NaN when one of them has a single value in this sample."""
    aucs = []
    for c in cols:
        auc = _binary_auc(scores[:, c], truth[:, c].astype(bool))
        if auc is None:
            return float("nan")
        aucs.append(auc)
    return float(np.mean(aucs))


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tied_tol: float = 1e-8) -> float:
    """Harrell's C as scikit-survival's concordance_index_censored computes it (an event is comparable with every
    later time and with a censoring at its own time; risk ties count one half), vectorised for the bootstrap.
    ValueError when no pair is comparable."""
    t, e, r = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    comparable = e[:, None] & ((t[None, :] > t[:, None]) | ((t[None, :] == t[:, None]) & ~e[None, :]))
    n = comparable.sum()
    if n == 0:
        raise ValueError("C-index undefined: no comparable pair")
    diff = r[:, None] - r[None, :]
    tie = np.abs(diff) <= tied_tol
    concordant = comparable & (diff > 0) & ~tie
    return float((concordant.sum() + 0.5 * (comparable & tie).sum()) / n)


KINDS = {  # kind -> (the array whose first axis is the item axis, the arrays of ground truth every model shares)
    "mean": ("values", ()),
    "auc": ("labels", ("labels",)),
    "auc_multilabel": ("labels", ("labels",)),
    "cindex": ("time", ("time", "event")),
}


@dataclass
class Outcome:
    """One headline metric's per-item outcomes, in the dataset's item order, and the resampling design its CI
    and every paired test use. kind: `mean` (values: one number per item, e.g. correct 0/1, or its mean over
    head seeds), `auc` (scores (seeds, n, C), labels (n,)), `auc_multilabel` (scores (seeds, n, C), labels
    (n, C)), `cindex` (risk (seeds, n), time, event). With several seeds the statistic is the mean over seeds."""

    kind: str
    data: dict[str, np.ndarray]
    clusters: np.ndarray | None = None
    strata: np.ndarray | None = None
    design: str = "items"  # says what a resample draws, for the leaderboard's legend
    _cols: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"outcome kind '{self.kind}': expected one of {sorted(KINDS)}")
        self.data = {k: np.asarray(v) for k, v in self.data.items()}
        if self.kind == "auc_multilabel":  # the classes with both values over all items: fixed for every resample
            y = self.data["labels"]
            self._cols = np.flatnonzero((y.min(0) == 0) & (y.max(0) == 1))

    @property
    def n(self) -> int:
        return len(self.data[KINDS[self.kind][0]])

    def value(self, idx: np.ndarray | None = None) -> float:
        """The metric on items idx (all items when None)."""
        idx = np.arange(self.n) if idx is None else np.asarray(idx)
        d = self.data
        if self.kind == "mean":
            return float(d["values"][idx].mean())
        if self.kind == "cindex":
            return float(np.mean([harrell_c(d["time"][idx], d["event"][idx], r[idx]) for r in d["risk"]]))
        fn = _ovr_auc if self.kind == "auc" else (lambda s, y: _multilabel_auc(s, y, self._cols))
        return float(np.mean([fn(s[idx], d["labels"][idx]) for s in d["scores"]]))

    def plan(self, seed: int, resamples: int = RESAMPLES) -> list[np.ndarray]:
        return resample_plan(self.n, seed, resamples, self.clusters, self.strata)

    def same_items(self, other: "Outcome") -> bool:
        """Whether two models' outcomes describe the same items under the same design (a paired test needs it)."""
        def eq(a, b):
            return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
        return (self.kind == other.kind and self.n == other.n and eq(self.clusters, other.clusters)
                and eq(self.strata, other.strata)
                and all(eq(self.data[k], other.data.get(k)) for k in KINDS[self.kind][1]))

    def with_ci(self, name: str, plan: list[np.ndarray], out: dict) -> dict:
        """out[name], out[name_ci_low], out[name_ci_high]: the value and its CI over `plan`."""
        out[name] = self.value()
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = plan_ci(self.value, plan)
        return out
