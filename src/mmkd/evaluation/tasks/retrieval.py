"""Owns image-text retrieval: recall@k and the rank of the best positive, both directions, ties counted against,
each distinct caption one query and one gallery entry."""

from __future__ import annotations

import numpy as np

from mmkd.evaluation.stats import Outcome
from mmkd.evaluation.tasks import BOOTSTRAP_SEED

BY_CAPTION = "caption groups"


def best_positive_rank(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-scoring positive: 1 + the negatives scoring at least as high. A tie with
    a negative counts against the query, so the metric cannot be won by an encoder that maps everything to one
    point (a top-k with arbitrary tie order would score such an encoder by luck)."""
    best = np.where(positives, scores, -np.inf).max(1)
    return 1 + ((scores >= best[:, None]) & ~positives).sum(1)


def caption_groups(groups, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(group index 0..G-1 per row, the first row of each group): rows sharing a `groups` value share a caption."""
    if groups is None:
        return np.arange(n), np.arange(n)
    _, first, g = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    return g.ravel(), first


def retrieval(image_emb: np.ndarray, text_emb: np.ndarray, groups=None, ks=(1, 5, 10),
              outcomes: dict | None = None) -> dict:
    """Row i of images and texts is a pair; rows with the same `groups` value carry the same caption. Each
    distinct caption is ONE text query and stands ONCE in the image->text gallery: text->image, a caption's
    positives are all the images of its group; image->text, the gallery is the distinct captions and an image's
    one positive is its own caption. CIs (R@1) and paired tests resample caption groups (an image query is drawn
    with its group). Without groups every row is its own group, and r@k equals CLIP_benchmark's
    text_retrieval_recall@k (i2t) and image_retrieval_recall@k (t2i)."""
    image = np.asarray(image_emb, dtype=np.float32)
    g, first = caption_groups(groups, len(image))
    sim = image @ np.asarray(text_emb, dtype=np.float32)[first].T  # images x distinct captions
    positives = g[:, None] == np.arange(len(first))[None, :]
    out: dict = {}
    for name, s, pos, clusters in (("i2t", sim, positives, g), ("t2i", sim.T, positives.T, None)):
        rank = best_positive_rank(s, pos)
        for k in ks:
            out[f"{name}_r{k}"] = float((rank <= k).mean())
        if 1 in ks:
            hit = Outcome("mean", {"values": (rank <= 1).astype(float)}, clusters=clusters, design=BY_CAPTION)
            hit.with_ci(f"{name}_r1", hit.plan(BOOTSTRAP_SEED), out)
            if outcomes is not None:
                outcomes[f"{name}_r1"] = hit
        out[f"{name}_median_rank"] = float(np.median(rank))
        out[f"{name}_mean_rank"] = float(np.mean(rank))
    return out
