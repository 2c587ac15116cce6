"""Owns the selection score (the promotion gate's, the ablations'): zero-shot and linear-probe outcomes per item on
the suite's val split, and the paired bootstrap of two models' difference on them. The test split, which the
leaderboard reports, is never read here."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from mmkd.evaluation.dataset import EvalDataset, ImageSource
from mmkd.evaluation.stats import RESAMPLES, paired_bootstrap, resample_plan

log = logging.getLogger("mmkd")
SPLIT = "val"
METRIC = "val.zeroshot_acc1"  # mean over the selection sets of each set's zero-shot top-1 accuracy on its val split


class SelectionError(ValueError):
    """No item to select on (no zero-shot set with a val split), or outcomes that do not match the items."""


class _Subset(ImageSource):
    """Some images of a source, by their index there: only the val images are decoded and encoded."""

    def __init__(self, source: ImageSource, index: np.ndarray):
        self.source, self.index = source, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int):
        return self.source.load(int(self.index[i]))

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.source.fingerprint()}:{self.index.tobytes().hex()}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SelectionSet:
    """One classification set's selection items: a val-only view of the dataset and each class's prompts."""

    name: str
    view: EvalDataset       # images: the val images only; item_image indexes them
    prompts: list[list[str]]  # per class, in the dataset's class order
    dataset: EvalDataset      # the whole dataset and its catalog prompts (the evaluation's embedding cache is
    items: np.ndarray         # keyed by them); items: the view's items in it
    entry_prompts: dict

    @property
    def labels(self) -> np.ndarray:
        return self.view.labels


def selectable(entry) -> bool:
    """A single-label zero-shot set with a val split (a multilabel set has no per-item right or wrong)."""
    return "zeroshot" in entry.tasks and SPLIT in entry.splits and not entry.multilabel


def val_items(ds: EvalDataset, max_items: int, seed: int) -> np.ndarray:
    """The dataset's val items: at most max_items, drawn with `seed`, in file order."""
    items = np.flatnonzero(ds.split_mask(SPLIT))
    if len(items) > max_items:  # a large real val split: a fixed random subset keeps registration short
        items = np.sort(np.random.default_rng(seed).choice(items, max_items, replace=False))
    return items


def val_view(ds: EvalDataset, items: np.ndarray) -> EvalDataset:
    """The dataset restricted to `items`, over their images only (only those are decoded and encoded)."""
    images, item_image = np.unique(ds.item_image[items], return_inverse=True)
    return replace(ds, images=_Subset(ds.images, images), item_image=item_image.reshape(-1),
                   item_split=ds.item_split[items], labels=ds.labels[items], captions=None, questions=None,
                   answers=None, question_types=None, rejected=[])


def selection_sets(entries, load: Callable[[object], EvalDataset], max_items: int, seed: int) -> list[SelectionSet]:
    """The selection sets of `entries` (catalog entries, in order): every selectable one, loaded with `load`."""
    out = []
    for e in entries:
        if not selectable(e):
            continue
        ds = load(e)
        items = val_items(ds, max_items, seed)
        if len(items) == 0:
            log.warning("gate: %s has no %s items; not used for selection", e.name, SPLIT)
            continue
        out.append(SelectionSet(e.name, val_view(ds, items), [list(e.prompts[c]) for c in ds.classes], ds, items,
                                dict(e.prompts)))
    return out


def evaluation_embeddings(encoder, version: str, s: SelectionSet, cache_dir: Path):
    """The embeddings the evaluate step cached for this model and dataset (Embeddings of the whole dataset), or
    None when there are none for these weights, images and texts: then only the val images are encoded."""
    from mmkd.evaluation.embeddings import Embeddings, cache_key, texts_of

    path = Path(cache_dir) / encoder.name / f"{s.dataset.name}.npz"
    if not path.exists():
        return None
    key = cache_key(version, s.dataset, texts_of(s.dataset, s.entry_prompts), encoder.spec.size)
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            return None
        return Embeddings(z["image"], [str(t) for t in z["texts"]], z["text"])


def set_outcomes(encoder, s: SelectionSet, batch: int, cached=None) -> np.ndarray:
    """1/0 per item: the encoder's zero-shot prediction (prompt ensembles, as the evaluation's) is the label.
    cached: the evaluation's Embeddings of the whole dataset for this encoder (evaluation_embeddings)."""
    from mmkd.evaluation.embeddings import encode_dataset
    from mmkd.evaluation.tasks.zeroshot import class_embeddings

    if cached is not None:
        emb, image = cached, cached.image[s.dataset.item_image[s.items]]
    else:
        emb = encode_dataset(encoder, s.view, list(dict.fromkeys(p for ps in s.prompts for p in ps)), batch)
        image = emb.image[s.view.item_image]
    logits = image.astype(np.float64) @ class_embeddings([emb.of(p) for p in s.prompts]).T
    return (logits.argmax(1) == s.labels).astype(np.float64)


def set_probe_outcomes(encoder, s: SelectionSet, batch: int, seed: int, head_seeds: int, c_grid) -> np.ndarray:
    """Per val item, the mean over `head_seeds` heads of 1/0: a linear probe fitted on the set's train split, C
    chosen by cross-validation on that train split (never on val), predicts the item's label. Only the train and
    val images are encoded."""
    from mmkd.evaluation.embeddings import encode_dataset
    from mmkd.evaluation.tasks.probe import linear_probe

    train = np.flatnonzero(s.dataset.split_mask("train"))
    if len(train) == 0:
        raise SelectionError(f"{s.name}: no train items to fit a probe on")
    view = val_view(s.dataset, np.concatenate([train, s.items]))
    x = encode_dataset(encoder, view, [], batch).image[view.item_image]
    x_train, x_val = x[:len(train)], x[len(train):]
    outcomes: dict = {}
    linear_probe(x_train, view.labels[:len(train)], None, None, x_val, s.labels, len(s.dataset.classes), seed,
                 fractions=(1.0,), k_shots=(), c_grid=tuple(c_grid), head_seeds=head_seeds, outcomes=outcomes)
    return np.asarray(outcomes["probe_acc1"].data["values"], dtype=np.float64)


@dataclass(frozen=True)
class Selection:
    """The selection items of every set, concatenated in set order."""

    sets: list[SelectionSet]

    def __post_init__(self):
        if not self.sets:
            raise SelectionError(f"no selection items: none of the evaluated datasets is a single-label zero-shot "
                                 f"set with a '{SPLIT}' split (evaluate.datasets: include `embedded` or such a set)")

    @property
    def n(self) -> int:
        return sum(len(s.labels) for s in self.sets)

    @property
    def dataset(self) -> np.ndarray:
        return np.concatenate([np.full(len(s.labels), s.name, dtype=object) for s in self.sets])

    @property
    def strata(self) -> np.ndarray:
        """dataset and class: the bootstrap keeps every (set, class) count, as the evaluation's CIs do."""
        return np.concatenate([np.array([f"{s.name}\0{y}" for y in s.labels], dtype=object) for s in self.sets])

    @property
    def weights(self) -> np.ndarray:
        """1 / (sets x the item's set size): weights @ outcomes is the mean over sets of each set's accuracy, on
        every resample too, since the stratified resample keeps each set's size."""
        return np.concatenate([np.full(len(s.labels), 1.0 / (len(self.sets) * len(s.labels))) for s in self.sets])

    def outcomes(self, encoder, batch: int, cache_dir: Path | None = None, version: str | None = None) -> np.ndarray:
        """1/0 per item for `encoder`; with the evaluate step's embedding cache (cache_dir, the weights' version)
        a set the evaluation embedded for this encoder is not encoded again."""
        return np.concatenate([
            set_outcomes(encoder, s, batch, evaluation_embeddings(encoder, version, s, cache_dir)
                         if cache_dir is not None and version is not None else None) for s in self.sets])

    def probe_outcomes(self, encoder, batch: int, seed: int, head_seeds: int = 3,
                       c_grid=(0.01, 0.1, 1.0, 10.0, 100.0)) -> np.ndarray:
        """Per item, the linear probe's mean correctness over head seeds (set_probe_outcomes), in set order."""
        return np.concatenate([set_probe_outcomes(encoder, s, batch, seed, head_seeds, c_grid) for s in self.sets])

    def score(self, outcomes: np.ndarray) -> float:
        return float(self.weights @ self._checked(outcomes))

    def per_set(self, outcomes: np.ndarray) -> dict[str, float]:
        o, names = self._checked(outcomes), self.dataset
        return {s.name: float(o[names == s.name].mean()) for s in self.sets}

    def _checked(self, outcomes: np.ndarray) -> np.ndarray:
        o = np.asarray(outcomes, dtype=np.float64)
        if o.shape != (self.n,):
            raise SelectionError(f"outcomes of shape {o.shape}: expected one per selection item ({self.n})")
        return o

    def compare(self, challenger: np.ndarray, champion: np.ndarray, seed: int, margin: float,
                resamples: int = RESAMPLES, level: float = 0.95) -> dict:
        """challenger - champion on the same items and the same stratified resamples (a paired bootstrap):
        {diff, low, high, a (challenger), b (champion), resamples, level, margin, n_items, n_sets, per_set,
        passed}; passed: the lower bound is at least -margin (a NaN bound never passes)."""
        a, b, w = self._checked(challenger), self._checked(champion), self.weights
        plan = resample_plan(self.n, seed, resamples, strata=self.strata)
        paired = paired_bootstrap(lambda i: w[i] @ a[i], lambda i: w[i] @ b[i], plan, self.n, level)
        per_a, per_b = self.per_set(a), self.per_set(b)
        return {**paired, "level": level, "margin": float(margin), "n_items": self.n, "n_sets": len(self.sets),
                "per_set": {k: {"challenger": per_a[k], "champion": per_b[k]} for k in per_a},
                "passed": bool(paired["low"] >= -margin)}


def load_entries(entries, folder_of: Callable[[object], Path], max_items: int, seed: int) -> Selection:
    """The Selection of catalog `entries` whose folders `folder_of` gives (the catalog's loaders read them)."""
    from mmkd.evaluation.catalog import load_dataset

    def load(e):
        ds = load_dataset(e, folder_of(e))
        if ds.rejected:  # the evaluate step reported them already (artifacts/evaluation/rejected/)
            log.info("gate: %s: %d records refused by its loader", e.name, len(ds.rejected))
        return ds

    return Selection(selection_sets(entries, load, max_items, seed))
