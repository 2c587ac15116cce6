"""Owns one evaluation unit: a model on a dataset -> its embeddings (cached) -> every task the dataset supports."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mmkd.evaluation.dataset import DatasetFormatError, EvalDataset
from mmkd.evaluation.embeddings import Embeddings, dataset_embeddings
from mmkd import atomic


def _test_items(ds: EvalDataset) -> np.ndarray:
    return np.flatnonzero(ds.split_mask("test"))


def _zeroshot(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int) -> dict:
    from mmkd.evaluation.tasks.zeroshot import zero_shot

    missing = [c for c in ds.classes if not entry.prompts or not entry.prompts.get(c)]
    if missing:
        raise DatasetFormatError(f"{ds.name}: no zero-shot prompts for classes {missing} in the catalog entry")
    test = _test_items(ds)
    cls = [emb.of(list(entry.prompts[c])) for c in ds.classes]
    return zero_shot(emb.image[ds.item_image[test]], cls, ds.labels[test], multilabel=ds.multilabel)


def _probe(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int) -> dict:
    from mmkd.evaluation.tasks.probe import linear_probe

    x = emb.image[ds.item_image]
    tr, va, te = (ds.split_mask(s) for s in ("train", "val", "test"))
    if not tr.any():
        return {}
    p = cfg.probe
    return linear_probe(x[tr], ds.labels[tr], x[va], ds.labels[va], x[te], ds.labels[te], len(ds.classes), seed,
                        fractions=tuple(p.fractions), k_shots=tuple(p.k_shots), c_grid=tuple(p.c_grid))


def _retrieval(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int) -> dict:
    from mmkd.evaluation.tasks.retrieval import retrieval

    if not ds.captions:
        raise DatasetFormatError(f"{ds.name}: retrieval needs a caption per item; the dataset has none")
    test = _test_items(ds)
    captions = [ds.captions[i] for i in test]
    # identical captions describe indistinguishable images: each is a positive of the other's query
    _, groups = np.unique(np.array(captions, dtype=object).astype(str), return_inverse=True)
    out = retrieval(emb.image[ds.item_image[test]], emb.of(captions), groups, tuple(cfg.recall_k))
    out["retrieval_n_unique_captions"] = float(groups.max() + 1 if len(groups) else 0)
    return out


def _vqa(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int) -> dict:
    from mmkd.evaluation.tasks.vqa import vqa

    return vqa(emb.image[ds.item_image], emb.of(ds.questions), ds.answers, ds.question_types, ds.item_split, seed)


def _pooled_bags(ds: EvalDataset, emb: Embeddings) -> np.ndarray:
    pooled = np.stack([emb.image[b].mean(0) for b in ds.bags])
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _survival(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int) -> dict:
    from mmkd.evaluation.tasks.survival import survival

    return survival(_pooled_bags(ds, emb), ds.time, ds.event, seed, folds=cfg.folds)


def _mil(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int) -> dict:
    from mmkd.evaluation.tasks.mil import mil

    return mil([emb.image[b] for b in ds.bags], ds.labels, len(ds.classes), seed, folds=cfg.folds)


TASK_RUNNERS = {"zeroshot": _zeroshot, "probe": _probe, "retrieval": _retrieval, "vqa": _vqa,
                "survival": _survival, "mil": _mil}


def evaluate_pair(encoder, model_version: str, entry, ds: EvalDataset, cfg, seed: int, cache_dir: Path | None,
                  images=None) -> dict:
    """Every task of `entry` for one model: {"metrics": {...}, "seconds", "embeddings_cached", ...}."""
    t0 = time.perf_counter()
    if ds.bag_features is not None:
        raise DatasetFormatError(f"{ds.name}: precomputed patch features (from {ds.feature_encoder}) cannot be "
                                 f"re-encoded by {encoder.name}; evaluate such a dataset from its patch images")
    emb, cached = dataset_embeddings(encoder, model_version, ds, entry.prompts, cfg.batch_size, cache_dir, images)
    t_embed = time.perf_counter() - t0
    metrics: dict[str, float] = {}
    task_seconds = {}
    for task in entry.tasks:
        t1 = time.perf_counter()
        metrics.update(TASK_RUNNERS[task](ds, emb, entry, cfg, seed))
        task_seconds[task] = round(time.perf_counter() - t1, 3)
    if ds.item_split is not None:
        metrics["n_test"] = float(ds.split_mask("test").sum())
    elif ds.bags is not None:
        metrics["n_test"] = float(len(ds.bags))
    return {"metrics": metrics, "embeddings_cached": cached, "embed_seconds": round(t_embed, 3),
            "task_seconds": task_seconds, "seconds": round(time.perf_counter() - t0, 3)}


def result_path(results_dir: Path, model: str, dataset: str) -> Path:
    return Path(results_dir) / model / f"{dataset}.json"


def write_result(results_dir: Path, model: str, dataset: str, result: dict) -> Path:
    path = result_path(results_dir, model, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"model": model, "dataset": dataset, **result}, sort_keys=True)
    return path
