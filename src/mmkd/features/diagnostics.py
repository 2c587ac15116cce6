"""Owns the shared-space diagnostic: do two teachers' projections of the same sample agree, beyond their modality?

For every teacher pair that declares a modality, on that modality's samples both teachers have features for:
each teacher's projected image features with the modality's mean (that teacher's) removed, re-normalised; then
- `same`: the mean cosine between the two teachers' vectors of the same sample,
- `shuffled`: the same with one side permuted (a seeded derangement: no sample meets itself),
- `gap` = same - shuffled (0 when the projections share nothing but the modality cluster),
- `nn_rate`: how often a sample's nearest neighbour among the other teacher's projections is itself (both
  directions averaged; chance is 1/n),
- `raw_same`/`raw_shuffled`: the same two cosines without centring (the modality cluster counts there).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point (n >= 2): a random cycle through all n samples."""
    order = rng.permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, -1)
    return out


def pair_agreement(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> dict:
    """Agreement of two [n, d] views of the same n samples (row i of a and of b: one sample)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair_agreement needs two [n, d] arrays of one shape, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 3:
        raise ValueError(f"pair_agreement needs at least 3 samples, got {n}")
    perm = derangement(n, rng)
    ua, ub = _unit(a), _unit(b)
    ca, cb = _unit(a - a.mean(0)), _unit(b - b.mean(0))
    same = float(np.mean(np.sum(ca * cb, 1)))
    shuffled = float(np.mean(np.sum(ca * cb[perm], 1)))
    sim = ca @ cb.T
    idx = np.arange(n)
    nn = 0.5 * (float(np.mean(sim.argmax(1) == idx)) + float(np.mean(sim.argmax(0) == idx)))
    return {"n": n, "same": same, "shuffled": shuffled, "gap": same - shuffled, "nn_rate": nn, "nn_chance": 1.0 / n,
            "raw_same": float(np.mean(np.sum(ua * ub, 1))), "raw_shuffled": float(np.mean(np.sum(ua * ub[perm], 1)))}


def shared_space(images: dict[str, np.ndarray], available: dict[str, np.ndarray], modality: np.ndarray,
                 domains: dict[str, list[str]], seed: int, min_samples: int = 3,
                 max_samples: int = 4000) -> list[dict]:
    """One row per (modality, teacher pair) where both teachers declare the modality: pair_agreement on the
    modality's samples both have features for. images: teacher -> [N, d] projected image features (one row per
    sample, the same samples for every teacher); available: teacher -> [N] bool; modality: [N] names.
    A pair with fewer than `min_samples` shared samples is reported with n and no numbers; one with more than
    `max_samples` is measured on a seeded subset of that many (the nearest-neighbour search is n x n)."""
    modality = np.asarray(modality).astype(str)
    names = list(domains)
    missing = [t for t in names if t not in images or t not in available]
    if missing:
        raise KeyError(f"shared_space: no features given for teachers {missing}")
    rows = []
    for m in sorted(set(modality)):
        in_m = modality == m
        for a, b in combinations([t for t in names if m in domains[t]], 2):
            sel = np.flatnonzero(in_m & np.asarray(available[a], bool) & np.asarray(available[b], bool))
            row = {"modality": m, "pair": f"{a}|{b}", "n": int(len(sel))}
            if len(sel) >= min_samples:
                # one generator per pair, seeded from the seed and the pair: a row does not depend on which others exist
                key = np.frombuffer(f"{m}|{a}|{b}".encode(), np.uint8).astype(np.uint64).tolist()
                rng = np.random.default_rng([seed, *key])
                if len(sel) > max_samples:
                    sel = np.sort(rng.choice(sel, max_samples, replace=False))
                row.update(pair_agreement(images[a][sel], images[b][sel], rng))
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    """Worst and mean gap and nn rate over the measured pairs (the numbers a run is judged by)."""
    done = [r for r in rows if "gap" in r]
    if not done:
        return {"pairs": 0}
    gaps = np.array([r["gap"] for r in done])
    nn = np.array([r["nn_rate"] for r in done])
    return {"pairs": len(done), "gap_min": float(gaps.min()), "gap_mean": float(gaps.mean()),
            "nn_rate_min": float(nn.min()), "nn_rate_mean": float(nn.mean())}


def metric_items(rows: list[dict], prefix: str) -> dict[str, float]:
    """Flat MLflow metrics: `<prefix>.<modality>.<a>__<b>.<same|shuffled|gap|nn_rate>` (MLflow keys allow no '|')."""
    out = {}
    for r in rows:
        if "gap" in r:
            base = f"{prefix}.{r['modality']}.{r['pair'].replace('|', '__')}"
            out.update({f"{base}.{k}": float(r[k]) for k in ("same", "shuffled", "gap", "nn_rate")})
    out.update({f"{prefix}.{k}": float(v) for k, v in summary(rows).items()})
    return out


def format_rows(rows: list[dict]) -> list[str]:
    """The table `mmkd features stats` prints."""
    lines = [f"  {'modality':<12} {'pair':<22} {'n':>5} {'same':>7} {'shuffled':>8} {'gap':>7} {'nn':>6} {'chance':>6}"]
    for r in rows:
        if "gap" not in r:
            lines.append(f"  {r['modality']:<12} {r['pair']:<22} {r['n']:>5}  (too few shared samples)")
            continue
        lines.append(f"  {r['modality']:<12} {r['pair']:<22} {r['n']:>5} {r['same']:>7.3f} {r['shuffled']:>8.3f} "
                     f"{r['gap']:>+7.3f} {r['nn_rate']:>6.1%} {r['nn_chance']:>6.1%}")
    return lines
