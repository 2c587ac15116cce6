"""Owns one evaluation unit: a model on a dataset -> its embeddings (cached) -> every task the dataset supports,
its metrics and its per-item outcomes (artifacts/evaluation/results), and the dataset's content fingerprint."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from mmkd.evaluation.dataset import DatasetFormatError, EvalDataset
from mmkd.evaluation.embeddings import Embeddings, dataset_embeddings
from mmkd.evaluation.stats import Outcome
from mmkd import atomic


def _test_items(ds: EvalDataset) -> np.ndarray:
    return np.flatnonzero(ds.split_mask("test"))


def _zeroshot(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int, outcomes: dict) -> dict:
    from mmkd.evaluation.tasks.zeroshot import zero_shot

    missing = [c for c in ds.classes if not entry.prompts or not entry.prompts.get(c)]
    if missing:
        raise DatasetFormatError(f"{ds.name}: no zero-shot prompts for classes {missing} in the catalog entry")
    test = _test_items(ds)
    cls = [emb.of(list(entry.prompts[c])) for c in ds.classes]
    return zero_shot(emb.image[ds.item_image[test]], cls, ds.labels[test], multilabel=ds.multilabel,
                     outcomes=outcomes)


def _probe(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int, outcomes: dict) -> dict:
    from mmkd.evaluation.tasks.probe import linear_probe

    x = emb.image[ds.item_image]
    tr, va, te = (ds.split_mask(s) for s in ("train", "val", "test"))
    if not tr.any():
        return {}
    p = cfg.probe
    return linear_probe(x[tr], ds.labels[tr], x[va], ds.labels[va], x[te], ds.labels[te], len(ds.classes), seed,
                        fractions=tuple(p.fractions), k_shots=tuple(p.k_shots), c_grid=tuple(p.c_grid),
                        head_seeds=cfg.head_seeds, outcomes=outcomes)


def _retrieval(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int, outcomes: dict) -> dict:
    from mmkd.evaluation.tasks.retrieval import retrieval

    if not ds.captions:
        raise DatasetFormatError(f"{ds.name}: retrieval needs a caption per item; the dataset has none")
    test = _test_items(ds)
    captions = [ds.captions[i] for i in test]
    # identical captions: one query, one gallery entry, every image of the caption its positive
    _, groups = np.unique(np.array(captions, dtype=object).astype(str), return_inverse=True)
    out = retrieval(emb.image[ds.item_image[test]], emb.of(captions), groups, tuple(cfg.recall_k), outcomes)
    out["retrieval_n_unique_captions"] = float(groups.max() + 1 if len(groups) else 0)
    return out


def _vqa(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int, outcomes: dict) -> dict:
    from mmkd.evaluation.tasks.vqa import vqa

    return vqa(emb.image[ds.item_image], emb.of(ds.questions), ds.answers, ds.question_types, ds.item_split, seed,
               image_ids=ds.item_image, outcomes=outcomes)


def _pooled_bags(ds: EvalDataset, emb: Embeddings) -> np.ndarray:
    pooled = np.stack([emb.image[b].mean(0) for b in ds.bags])
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _survival(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int, outcomes: dict) -> dict:
    from mmkd.evaluation.tasks.survival import survival

    return survival(_pooled_bags(ds, emb), ds.time, ds.event, seed, folds=cfg.folds, outcomes=outcomes)


def _mil(ds: EvalDataset, emb: Embeddings, entry, cfg, seed: int, outcomes: dict) -> dict:
    from mmkd.evaluation.tasks.mil import mil

    return mil([emb.image[b] for b in ds.bags], ds.labels, len(ds.classes), seed, folds=cfg.folds,
               head_seeds=cfg.head_seeds, outcomes=outcomes)


TASK_RUNNERS = {"zeroshot": _zeroshot, "probe": _probe, "retrieval": _retrieval, "vqa": _vqa,
                "survival": _survival, "mil": _mil}


def evaluate_pair(encoder, model_version: str, entry, ds: EvalDataset, cfg, seed: int, cache_dir: Path | None,
                  images=None) -> dict:
    """Every task of `entry` for one model: {"metrics": {...}, "outcomes": {metric: Outcome} (the per-item
    outcomes of every headline metric, for the report's paired tests), "seconds", "embeddings_cached", ...}."""
    t0 = time.perf_counter()
    if ds.bag_features is not None:
        raise DatasetFormatError(f"{ds.name}: precomputed patch features (from {ds.feature_encoder}) cannot be "
                                 f"re-encoded by {encoder.name}; evaluate such a dataset from its patch images")
    emb, cached = dataset_embeddings(encoder, model_version, ds, entry.prompts, cfg.batch_size, cache_dir, images)
    t_embed = time.perf_counter() - t0
    metrics: dict[str, float] = {}
    outcomes: dict[str, Outcome] = {}
    task_seconds = {}
    for task in entry.tasks:
        t1 = time.perf_counter()
        metrics.update(TASK_RUNNERS[task](ds, emb, entry, cfg, seed, outcomes))
        task_seconds[task] = round(time.perf_counter() - t1, 3)
    if ds.item_split is not None:
        metrics["n_test"] = float(ds.split_mask("test").sum())
    elif ds.bags is not None:
        metrics["n_test"] = float(len(ds.bags))
    return {"metrics": metrics, "outcomes": outcomes, "embeddings_cached": cached, "embed_seconds": round(t_embed, 3),
            "task_seconds": task_seconds, "seconds": round(time.perf_counter() - t0, 3)}


def result_path(results_dir: Path, model: str, dataset: str) -> Path:
    return Path(results_dir) / model / f"{dataset}.json"


def outcomes_path(results_dir: Path, model: str, dataset: str) -> Path:
    return Path(results_dir) / model / f"{dataset}.outcomes.npz"


def write_outcomes(path: Path, outcomes: dict[str, Outcome]) -> Path:
    """One npz: `<metric>.<field>` arrays, `<metric>.kind` and `.design`, and `.clusters` / `.strata` when set."""
    arrays: dict[str, np.ndarray] = {}
    for name, o in outcomes.items():
        arrays[f"{name}.kind"], arrays[f"{name}.design"] = np.array(o.kind), np.array(o.design)
        arrays.update({f"{name}.data.{k}": v for k, v in o.data.items()})
        for part in ("clusters", "strata"):
            if getattr(o, part) is not None:
                arrays[f"{name}.{part}"] = np.asarray(getattr(o, part))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as fh:
        np.savez_compressed(fh, **arrays)
    return path


def read_outcomes(path: Path) -> dict[str, Outcome]:
    with np.load(path, allow_pickle=False) as z:
        names = sorted({k.rsplit(".kind", 1)[0] for k in z.files if k.endswith(".kind")})
        out = {}
        for name in names:
            data = {k[len(name) + 6:]: z[k] for k in z.files if k.startswith(f"{name}.data.")}
            out[name] = Outcome(str(z[f"{name}.kind"]), data, z[f"{name}.clusters"] if f"{name}.clusters" in z.files
                                else None, z[f"{name}.strata"] if f"{name}.strata" in z.files else None,
                                str(z[f"{name}.design"]))
    return out


def write_result(results_dir: Path, model: str, dataset: str, result: dict) -> Path:
    """The unit's outcomes file first, then its result JSON (whose presence says the unit finished), atomically."""
    result = dict(result)
    outcomes = result.pop("outcomes", None)
    if outcomes is not None:
        write_outcomes(outcomes_path(results_dir, model, dataset), outcomes)
    path = result_path(results_dir, model, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"model": model, "dataset": dataset, **result}, sort_keys=True)
    return path


def dataset_fingerprint(ds: EvalDataset, entry) -> str:
    """What a dataset IS, for the evaluation id: the bytes of every image (its file, or its array) and every
    item's label, split, caption, question, answer, bag, time and event, and the entry's tasks and prompts. Two
    suites with the same names and sizes but other contents differ."""
    h = hashlib.sha256()
    images = ds.images
    if hasattr(images, "paths"):  # FileImages: the files' bytes, not their names or dates
        for p in images.paths:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    elif hasattr(images, "array"):
        h.update(np.ascontiguousarray(images.array).tobytes())
    else:
        for i in range(len(images)):
            h.update(images.load(i).tobytes())
    for name in ("item_image", "item_split", "labels", "captions", "questions", "answers", "question_types",
                 "bag_ids", "bag_split", "time", "event", "classes"):
        v = getattr(ds, name)
        h.update(f"\0{name}:".encode())
        if v is not None:
            h.update(json.dumps(np.asarray(v).tolist()).encode())
    for b in ds.bags or []:
        h.update(np.asarray(b).tobytes() + b"|")
    h.update(json.dumps({"tasks": list(entry.tasks), "prompts": entry.prompts}, sort_keys=True,
                        default=list).encode())
    return h.hexdigest()[:16]
