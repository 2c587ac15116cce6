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


def _nearest(ca: np.ndarray, cb: np.ndarray, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """argmax over each row and over each column of ca @ cb.T, computed `block` rows at a time: the n x n
    similarity (128 MB at n = 4000) is never held. Ties go to the first index, as np.argmax breaks them."""
    rows = np.empty(len(ca), np.int64)
    col_best, col_arg = np.full(len(cb), -np.inf), np.zeros(len(cb), np.int64)
    for at in range(0, len(ca), block):
        sim = ca[at : at + block] @ cb.T
        rows[at : at + block] = sim.argmax(1)
        top, arg = sim.max(0), sim.argmax(0) + at
        better = top > col_best  # strict: an earlier block keeps a tie
        col_best[better], col_arg[better] = top[better], arg[better]
    return rows, col_arg


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
    idx = np.arange(n)
    nn = 0.5 * sum(float(np.mean(best == idx)) for best in _nearest(ca, cb))
    return {"n": n, "same": same, "shuffled": shuffled, "gap": same - shuffled, "nn_rate": nn, "nn_chance": 1.0 / n,
            "raw_same": float(np.mean(np.sum(ua * ub, 1))), "raw_shuffled": float(np.mean(np.sum(ua * ub[perm], 1)))}


def pair_samples(available: dict[str, np.ndarray], modality: np.ndarray, domains: dict[str, list[str]], seed: int,
                 min_samples: int = 3, max_samples: int = 4000) -> list[tuple]:
    """The samples shared_space measures, chosen from availability and modality alone (no features read): per
    (modality, teacher pair) where both declare the modality, (row, a, b, sample indices or None when fewer than
    `min_samples`, the pair's generator). More than `max_samples`: a seeded subset of that many."""
    modality = np.asarray(modality).astype(str)
    names = list(domains)
    plan = []
    for m in sorted(set(modality)):
        in_m = modality == m
        for a, b in combinations([t for t in names if m in domains[t]], 2):
            sel = np.flatnonzero(in_m & np.asarray(available[a], bool) & np.asarray(available[b], bool))
            row, rng = {"modality": m, "pair": f"{a}|{b}", "n": int(len(sel))}, None
            if len(sel) >= min_samples:
                # one generator per pair, seeded from the seed and the pair: a row does not depend on which others exist
                key = np.frombuffer(f"{m}|{a}|{b}".encode(), np.uint8).astype(np.uint64).tolist()
                rng = np.random.default_rng([seed, *key])
                if len(sel) > max_samples:
                    sel = np.sort(rng.choice(sel, max_samples, replace=False))
            plan.append((row, a, b, sel if rng is not None else None, rng))
    return plan


def shared_space(images: dict[str, np.ndarray], available: dict[str, np.ndarray], modality: np.ndarray,
                 domains: dict[str, list[str]], seed: int, min_samples: int = 3,
                 max_samples: int = 4000) -> list[dict]:
    """One row per (modality, teacher pair) where both teachers declare the modality: pair_agreement on the
    modality's samples both have features for. images: teacher -> [N, d] projected image features (one row per
    sample, the same samples for every teacher); available: teacher -> [N] bool; modality: [N] names.
    A pair with fewer than `min_samples` shared samples is reported with n and no numbers; one with more than
    `max_samples` is measured on a seeded subset of that many (the nearest-neighbour search is n x n)."""
    return shared_space_read(lambda idx: {t: np.asarray(x)[idx] for t, x in images.items()}, available, modality,
                             domains, seed, min_samples, max_samples, names=list(images))


def shared_space_read(read, available: dict[str, np.ndarray], modality: np.ndarray, domains: dict[str, list[str]],
                      seed: int, min_samples: int = 3, max_samples: int = 4000, chunk: int = 4096,
                      names: list[str] | None = None) -> list[dict]:
    """shared_space with the features read on demand: read(idx) -> teacher -> [len(idx), d] image features of
    those samples. Only the samples pair_samples picks are read (in chunks of `chunk`), so what is held is at
    most max_samples per (modality, pair), whatever the split's size; the rows equal shared_space's."""
    missing = [t for t in domains if t not in available or (names is not None and t not in names)]
    if missing:
        raise KeyError(f"shared_space: no features given for teachers {missing}")
    plan = pair_samples(available, modality, domains, seed, min_samples, max_samples)
    picked = [sel for *_, sel, _ in plan if sel is not None]
    need = np.unique(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    parts = [read(need[i : i + chunk]) for i in range(0, len(need), chunk)]
    images = {t: np.concatenate([p[t] for p in parts]) for t in (parts[0] if parts else {})}
    rows = []
    for row, a, b, sel, rng in plan:
        if sel is not None:
            pos = np.searchsorted(need, sel)
            row.update(pair_agreement(images[a][pos], images[b][pos], rng))
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
