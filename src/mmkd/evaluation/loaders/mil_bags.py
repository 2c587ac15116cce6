"""Owns the mil_bags format: a class per bag (slide, scan), and its patch images, precomputed patch features, or
tiles cut from its whole slides (evaluation.slide_bags), CAMELYON16's official layout included."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmkd.evaluation import slide_bags
from mmkd.evaluation.dataset import DatasetFormatError, EvalDataset, FileImages
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "mil_bags"


class Options(slide_bags.SlideOptions):
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
    # set: CAMELYON16 as downloaded: training/{normal,tumor}/*.tif (split train), testing/images/*.tif labelled by
    # testing/reference.csv (split test); no labels table; bags are the slides' tiles
    camelyon16: bool = False


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


def _camelyon16(folder: Path, o: Options, rejected: list) -> tuple[list[dict], list[str], dict[str, str]]:
    """(rows as a labels table would give them, their record names, each slide id's path under folder)."""
    for need in ("training/normal", "training/tumor", "testing/images", "testing/reference.csv"):
        if not (folder / need).exists():
            raise DatasetFormatError(f"{folder}: {need} not found (camelyon16: the layout as downloaded)")
    rows, names, paths = [], [], {}
    cols = (o.id_col, o.label_col, o.split_col)

    def add(path: Path, label: str, split: str) -> None:
        rows.append(dict(zip(cols, (path.stem, label, split))))
        names.append(f"slide {common.rel(path, folder)}")
        paths[path.stem] = common.rel(path, folder)

    for label in ("normal", "tumor"):
        for p in slide_bags.slide_files(folder / "training" / label, o.exclude):
            add(p, label, "train")
    ref = folder / "testing" / "reference.csv"
    with open(ref, newline="", encoding="utf-8-sig") as fh:  # no header: slide, Normal|Tumor, Macro|Micro, ...
        table = {r[0].strip().lower(): (n, r[1].strip().lower()) for n, r in enumerate(csv.reader(fh), start=1)
                 if len(r) >= 2}
    tests = {p.stem.lower(): p for p in slide_bags.slide_files(folder / "testing" / "images", o.exclude)}
    for key, p in tests.items():
        if key in table:
            add(p, table[key][1], "test")
        else:
            rejected.append((f"slide {common.rel(p, folder)}", "no label in testing/reference.csv"))
    rejected += [(f"testing/reference.csv row {n} ({key})", "no slide in testing/images/")
                 for key, (n, _) in table.items() if key not in tests]
    return rows, names, paths


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    o: Options = entry.opts
    path = folder / o.file
    rejected: list = []
    if o.camelyon16:
        rows, names, named = _camelyon16(folder, o, rejected)
    else:
        need = (o.id_col, o.label_col) + ((o.slide_col,) if o.slides_dir and o.slide_col else ())
        rows = common.read_table(path, need, o.sep)
        names = [f"{o.file} row {n} ({row[o.id_col]})" for n, row in enumerate(rows, start=2)]
        # the first row of an id names its slide (a duplicate row is rejected below)
        named = ({row[o.id_col]: row[o.slide_col] for row in reversed(rows)} if o.slides_dir and o.slide_col
                 else None)
    has_split = bool(rows) and o.split_col in rows[0]
    index = {c: k for k, c in enumerate(entry.classes)}
    table: dict[str, tuple[int, str]] = {}
    for where, row in zip(names, rows):
        bid = row[o.id_col]
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
    images, feats, bags = FileImages([]), {}, {}
    if o.feature_encoder:
        feats = _feature_bags(folder, ids, o, rejected)
        kept = [i for i in ids if i in feats]
    elif o.camelyon16 or o.slides_dir:
        root = folder if o.camelyon16 else slide_bags.slides_root(folder, o)
        slides = slide_bags.find_slides(root, ids, o.slide_id or slide_bags.STEM, o.exclude, rejected,
                                        None if named is None else {i: named[i] for i in ids})
        images, bags = slide_bags.slide_bags(root, slides, o, rejected)
        kept = [i for i in ids if bags[i]]
    else:
        paths, bags = common.collect_bags(folder, ids, o.bags_file, o.patches_dir, o.exclude, rejected)
        images = FileImages(paths)
        kept = [i for i in ids if bags[i]]
        rejected += [(f"bag {i}", f"empty bag: no images in {o.patches_dir}/{i}/ or {o.bags_file}")
                     for i in ids if not bags[i]]
    if len(kept) < 2:
        where = folder if o.camelyon16 else path
        raise DatasetFormatError(f"{where}: {len(kept)} bag(s) with a known class and patches ({rejected[:3]})")
    return EvalDataset(name=entry.name, modality=common.modality_of(entry), images=images,
                       labels=np.array([table[i][0] for i in kept]), classes=list(entry.classes),
                       bags=None if o.feature_encoder else [np.array(bags[i]) for i in kept],
                       bag_features=[feats[i] for i in kept] if o.feature_encoder else None,
                       feature_encoder=o.feature_encoder, bag_ids=kept,
                       bag_split=np.array([table[i][1] for i in kept]) if has_split else None, rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    o: Options = entry.opts
    if o.camelyon16:
        ref = folder / "testing" / "reference.csv"
        if not (folder / "training").is_dir():
            return common.missing(entry, folder / "training")
        return ("present", str(folder)) if ref.is_file() else ("incomplete", f"{folder}/training present, not {ref}")
    path = folder / o.file
    if not path.is_file():
        return common.missing(entry, path)
    lacking = [c for c in (o.id_col, o.label_col) if c not in common.table_header(path, o.sep)]
    if lacking:
        return "incomplete", f"{path}: missing column(s) {lacking}"
    where = ([folder / o.features_dir] if o.feature_encoder else [folder / o.slides_dir] if o.slides_dir
             else [folder / o.bags_file, folder / o.patches_dir])
    if not any(p.exists() for p in where):
        return "incomplete", f"{path} present, but none of {[str(p) for p in where]}"
    return "present", str(path)
