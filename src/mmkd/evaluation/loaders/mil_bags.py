"""Owns the mil_bags format: a class per bag (slide, scan), and its patch images or precomputed patch features."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmkd.evaluation.dataset import DatasetFormatError, EvalDataset, FileImages
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "mil_bags"


class Options(common.Options):
    file: str = "labels.csv"
    sep: str = ","
    id_col: str = "bag_id"
    label_col: str = "label"
    label_map: dict[str, str | None] = {}  # raw label -> class name; null: not evaluated
    split_col: str = "split"  # used when the column exists
    split_map: dict[str, str] = {}
    bags_file: str = "bags.csv"  # bag_id, image; when absent, images are patches/<bag_id>/
    patches_dir: str = "patches"
    exclude: list[str] = []
    # set: bags are precomputed features/<bag_id>.pt (CLAM's pt_files: n_patches x dim) or .npy by this encoder
    feature_encoder: str | None = None
    features_dir: str = "features"


def _features(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    import torch

    t = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"holds a {type(t).__name__}, not a tensor")
    return t.float().numpy()


def _feature_bags(folder: Path, ids: list[str], o: Options, rejected: list) -> dict[str, np.ndarray]:
    out = {}
    for i in ids:
        found = [folder / o.features_dir / f"{i}{ext}" for ext in (".pt", ".npy")]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            rejected.append((f"bag {i}", f"empty bag: no {o.features_dir}/{i}.pt or .npy"))
            continue
        try:
            x = _features(path)
        except (OSError, ValueError, TypeError, RuntimeError, EOFError) as e:
            rejected.append((f"bag {i}", f"{common.rel(path, folder)} unreadable: {e}"))
            continue
        if x.ndim != 2 or len(x) == 0:
            rejected.append((f"bag {i}", f"{common.rel(path, folder)}: shape {x.shape}, expected (n_patches>0, dim)"))
            continue
        out[i] = x.astype(np.float32)
    return out


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    o: Options = entry.opts
    path = folder / o.file
    rows = common.read_table(path, (o.id_col, o.label_col), o.sep)
    has_split = bool(rows) and o.split_col in rows[0]
    index = {c: k for k, c in enumerate(entry.classes)}
    table: dict[str, tuple[int, str]] = {}
    rejected: list = []
    for n, row in enumerate(rows, start=2):
        bid, where = row[o.id_col], f"{o.file} row {n} ({row[o.id_col]})"
        name = o.label_map.get(row[o.label_col], row[o.label_col])
        split = common.map_split(row[o.split_col], o.split_map) if has_split else ""
        if not bid or bid in table:
            rejected.append((where, "empty bag id" if not bid else "duplicate bag id"))
        elif name is None or name not in index:
            reason = "not evaluated (label_map: null)" if name is None else "unknown class"
            rejected.append((where, f"label '{row[o.label_col]}': {reason}"))
        elif split is None:
            rejected.append((where, f"bad split '{row[o.split_col]}'"))
        else:
            table[bid] = (index[name], split)
    ids = list(table)
    images: list[Path] = []
    feats: dict[str, np.ndarray] = {}
    bags: dict[str, list[int]] = {}
    if o.feature_encoder:
        feats = _feature_bags(folder, ids, o, rejected)
        kept = [i for i in ids if i in feats]
    else:
        images, bags = common.collect_bags(folder, ids, o.bags_file, o.patches_dir, o.exclude, rejected)
        kept = [i for i in ids if bags[i]]
        rejected += [(f"bag {i}", f"empty bag: no images in {o.patches_dir}/{i}/ or {o.bags_file}")
                     for i in ids if not bags[i]]
    if len(kept) < 2:
        raise DatasetFormatError(f"{path}: {len(kept)} bag(s) with a known class and patches ({rejected[:3]})")
    return EvalDataset(name=entry.name, modality=common.modality_of(entry), images=FileImages(images),
                       labels=np.array([table[i][0] for i in kept]), classes=list(entry.classes),
                       bags=None if o.feature_encoder else [np.array(bags[i]) for i in kept],
                       bag_features=[feats[i] for i in kept] if o.feature_encoder else None,
                       feature_encoder=o.feature_encoder, bag_ids=kept,
                       bag_split=np.array([table[i][1] for i in kept]) if has_split else None, rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    o: Options = entry.opts
    path = folder / o.file
    if not path.is_file():
        return common.missing(entry, path)
    lacking = [c for c in (o.id_col, o.label_col) if c not in common.table_header(path, o.sep)]
    if lacking:
        return "incomplete", f"{path}: missing column(s) {lacking}"
    where = [folder / o.features_dir] if o.feature_encoder else [folder / o.bags_file, folder / o.patches_dir]
    if not any(p.exists() for p in where):
        return "incomplete", f"{path} present, but none of {[str(p) for p in where]}"
    return "present", str(path)
