"""Owns the training loop's epoch order: a global permutation, or the shard-aware WebDataset recipe.

`global` is a uniformly random permutation: with a corpus larger than the page cache, every row of every batch is a
random read. `shards` keeps reads local: the shards (runs of rows stored in one shard file) are shuffled, a window
of `shuffle_shards` of them is read together (their rows interleaved in storage order), and that stream passes
through a shuffle buffer of `shuffle_buffer` rows. Every row comes out exactly once per epoch, and the order is a
pure function of (seed, epoch, shard layout): a resumed run, or any rank, computes the same one.
"""

from __future__ import annotations

import numpy as np
import torch

_TAG = 0x5EED_0D3E  # separates this stream from every other use of the run's seed


def row_shards(images) -> np.ndarray:
    """[n] int: the shard file each row of `images` lives in, for the stores' readers (mmkd.data.store: the decoded
    views' SplitImages, ShardImages reading the tars, a Subset of either); any other array is one shard (it is in
    memory: there is no file layout to respect)."""
    base, rows = images, None
    if hasattr(images, "base") and hasattr(images, "rows"):  # a Subset: rows of its base
        base, rows = images.base, np.asarray(images.rows, dtype=np.int64)
    records, starts = getattr(base, "records", None), getattr(base, "starts", None)
    if records is not None:  # ShardImages: one part, rows from many tar shards
        full = np.unique([r["shard"] for r in records], return_inverse=True)[1].astype(np.int64).reshape(-1)
    elif starts is not None:  # SplitImages: one part per shard's decoded view
        full = np.repeat(np.arange(len(starts) - 1, dtype=np.int64), np.diff(np.asarray(starts, dtype=np.int64)))
    else:
        return np.zeros(len(images), dtype=np.int64)
    return full if rows is None else full[rows]


def shard_order(shard_of: np.ndarray, seed: int, epoch: int, window: int, buffer: int) -> np.ndarray:
    """Every index of `shard_of` once, in the windowed, buffered order (the module docstring); int64 [n].

    shard_of: each row's shard label (any ints; rows of one shard keep their relative order as they are read).
    """
    shard_of = np.asarray(shard_of)
    if shard_of.ndim != 1:
        raise ValueError(f"shard layout must be one label per row, got shape {shard_of.shape}")
    if window < 1 or buffer < 1:
        raise ValueError(f"shuffle_shards ({window}) and shuffle_buffer ({buffer}) must be >= 1")
    n = len(shard_of)
    rng = np.random.default_rng([_TAG, int(seed), int(epoch)])
    labels, member = np.unique(shard_of, return_inverse=True)
    by_shard = np.argsort(member, kind="stable")  # rows grouped by shard, storage order inside each
    counts = np.bincount(member, minlength=len(labels))
    starts = np.concatenate([[0], np.cumsum(counts)])
    # rank of each row inside its shard: the interleaving key of a window read in parallel
    rank = np.empty(n, dtype=np.int64)
    rank[by_shard] = np.arange(n) - np.repeat(starts[:-1], counts)
    shards = rng.permutation(len(labels))
    stream = []
    for w in range(0, len(shards), window):
        group = shards[w : w + window]
        rows = np.concatenate([by_shard[starts[s] : starts[s + 1]] for s in group])
        slot = np.concatenate([np.full(counts[s], k) for k, s in enumerate(group)])
        stream.append(rows[np.lexsort((slot, rank[rows]))])  # round-robin over the window's shards
    stream = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int64)
    return _buffered(stream, buffer, rng)


def _buffered(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """WebDataset's shuffle buffer: fill `size` rows, then each incoming row replaces a uniformly chosen one, which
    is emitted; at the end the rest leaves in random order."""
    n = len(stream)
    size = min(size, n)
    if size <= 1:
        return stream.astype(np.int64)
    out = np.empty(n, dtype=np.int64)
    buf = stream[:size].astype(np.int64).tolist()
    picks = rng.integers(0, size, n - size).tolist()  # one draw per incoming row: the stream length fixes the draws
    for k, (row, j) in enumerate(zip(stream[size:].tolist(), picks)):
        out[k] = buf[j]
        buf[j] = row
    out[n - size :] = rng.permutation(np.asarray(buf, dtype=np.int64))
    return out


def weighted_order(weights: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """n = len(weights) indices for one epoch in which row i appears floor(w_i) or ceil(w_i) times, w being
    `weights` scaled to mean 1: systematic resampling (one uniform offset, n evenly spaced points on the weights'
    cumulative sum) over a random permutation, then shuffled. Low variance: a row's count is never further than 1
    from its expectation, and the epoch keeps the loop's length."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    if n == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("sample weights must be finite, non-negative and not all zero")
    perm = torch.randperm(n, generator=gen).numpy()
    edges = np.cumsum(w[perm])
    edges *= n / edges[-1]
    offset = float(torch.rand(1, generator=gen, dtype=torch.float64))
    picks = perm[np.minimum(np.searchsorted(edges, offset + np.arange(n), side="right"), n - 1)]
    return torch.from_numpy(picks[torch.randperm(n, generator=gen).numpy()].astype(np.int64))


def epoch_order(mode: str, n: int, gen: torch.Generator, seed: int, epoch: int, shard_of: np.ndarray | None,
                window: int, buffer: int, weights: np.ndarray | None = None) -> torch.Tensor:
    """The loop's order for one epoch. global: torch.randperm from the loop's generator (the historical stream,
    unchanged), or weighted_order when per-row `weights` are given; shards: shard_order, which draws nothing from
    `gen` (and takes no weights)."""
    if mode == "global":
        if weights is not None:
            if len(weights) != n:
                raise ValueError(f"{len(weights)} sample weights for {n} samples")
            return weighted_order(weights, gen)
        return torch.randperm(n, generator=gen)
    if mode != "shards":
        raise ValueError(f"unknown train.shuffle '{mode}' (global | shards)")
    if weights is not None:
        raise ValueError("weighted sampling needs train.shuffle: global (shards keeps each shard's rows once)")
    if shard_of is None or len(shard_of) != n:
        raise ValueError(f"shard layout has {0 if shard_of is None else len(shard_of)} rows for {n} samples")
    return torch.from_numpy(shard_order(shard_of, seed, epoch, window, buffer))
