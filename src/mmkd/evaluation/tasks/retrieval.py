"""Owns image-text retrieval: recall@k and the rank of the best positive, both directions, ties counted against."""

from __future__ import annotations

import numpy as np

from mmkd.evaluation.stats import bootstrap_accuracy_ci
from mmkd.evaluation.tasks import BOOTSTRAP_SEED


def best_positive_rank(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scoring positive: 1 + the negatives scoring at least as high. A tie with
    a negative counts against the query, so the metric cannot be won by an encoder that maps everything to one
    point (a top-k with arbitrary tie order would score such an encoder by luck)."""
    best = np.where(positives, scores, -np.inf).max(1)
    return 1 + ((scores >= best[:, None]) & ~positives).sum(1)


def retrieval(image_emb: np.ndarray, text_emb: np.ndarray, groups=None, ks=(1, 5, 10)) -> dict:
    """Row i of images and texts is a positive pair; rows with the same `groups` value (identical captions) are
    positives of each other too. Without groups and ties, r@k equals CLIP_benchmark's text_retrieval_recall@k
    (i2t) and image_retrieval_recall@k (t2i)."""
    sim = np.asarray(image_emb, dtype=np.float32) @ np.asarray(text_emb, dtype=np.float32).T
    n = len(sim)
    positives = np.eye(n, dtype=bool)
    if groups is not None:
        g = np.asarray(groups)
        positives |= g[:, None] == g[None, :]
    out: dict = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):  # positives is symmetric, so t2i is the transpose
        rank = best_positive_rank(s, positives)
        for k in ks:
            out[f"{name}_r{k}"] = float((rank <= k).mean())
        if 1 in ks:  # bootstrap over queries: one stratum, so this vectorised draw is the plain bootstrap
            out[f"{name}_r1_ci_low"], out[f"{name}_r1_ci_high"] = bootstrap_accuracy_ci(rank <= 1, np.zeros(n),
                                                                                         BOOTSTRAP_SEED)
        out[f"{name}_median_rank"] = float(np.median(rank))
        out[f"{name}_mean_rank"] = float(np.mean(rank))
    return out
