"""Owns the medmnist_npz format: MedMNIST's `.npz` (train/val/test images and labels arrays)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmkd.evaluation.dataset import (
    SPLIT_NAMES,
    ArrayImages,
    DatasetFormatError,
    DatasetMissing,
    EvalDataset,
)
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "medmnist_npz"
KEYS = tuple(f"{s}_{k}" for s in SPLIT_NAMES for k in ("images", "labels"))


class Options(common.Options):
    file: str  # e.g. pathmnist.npz (28 px) or pathmnist_224.npz (MedMNIST+)


def _keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as npz:  # reads the zip directory only
            return list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetFormatError(f"{path} is not a readable .npz: {e}") from e


def _labels(y: np.ndarray, entry: CatalogEntry, where: str, rejected: list) -> tuple[list[int], list]:
    """Rows kept and their labels; a label out of range (or not 0/1 when multilabel) is a rejected record."""
    n_cls = len(entry.classes)
    if entry.multilabel:
        if y.ndim != 2 or y.shape[1] != n_cls:
            raise DatasetFormatError(f"{where}: shape {y.shape}, expected (N, {n_cls}) 0/1 for {n_cls} classes")
        ok = np.isin(y, (0, 1)).all(axis=1)
    else:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DatasetFormatError(f"{where}: shape {y.shape}, expected (N, 1) class indices")
        ok = (y >= 0) & (y < n_cls) & (y == np.round(y))
    for i in np.flatnonzero(~ok):
        rejected.append((f"{where}[{i}]", f"label {y[i].tolist()} not valid for {n_cls} classes"))
    keep = np.flatnonzero(ok)
    return keep.tolist(), list(y[keep].astype(np.int8 if entry.multilabel else np.int64))


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    path = folder / entry.opts.file
    if not path.is_file():
        raise DatasetMissing(f"{path} not found")
    absent = [k for k in KEYS if k not in _keys(path)]
    if absent:
        raise DatasetFormatError(f"{path}: missing key(s) {absent}")
    arrays, item_image, split, labels, rejected = [], [], [], [], []
    offset = 0
    with np.load(path, allow_pickle=False) as npz:
        for s in SPLIT_NAMES:
            x, y = npz[f"{s}_images"], npz[f"{s}_labels"]
            if len(x) != len(y):
                raise DatasetFormatError(f"{path}: {s}_images has {len(x)} rows, {s}_labels {len(y)}")
            keep, ys = _labels(y, entry, f"{entry.opts.file} {s}_labels", rejected)
            arrays.append(x)
            item_image += [offset + i for i in keep]
            split += [s] * len(keep)
            labels += ys
            offset += len(x)
    if not item_image:
        raise DatasetFormatError(f"{path}: no usable rows")
    return EvalDataset(name=entry.name, modality=common.modality_of(entry),
                       images=ArrayImages(np.concatenate(arrays)), item_image=np.array(item_image),
                       item_split=np.array(split), labels=np.stack(labels) if entry.multilabel else np.array(labels),
                       classes=list(entry.classes), multilabel=entry.multilabel, rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    path = folder / entry.opts.file
    if not path.is_file():
        return common.missing(entry, path)
    try:
        absent = [k for k in KEYS if k not in _keys(path)]
    except DatasetFormatError as e:
        return "incomplete", str(e)
    if absent:
        return "incomplete", f"{path}: missing key(s) {absent}"
    return "present", f"{path}"
