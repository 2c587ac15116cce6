"""Owns the csv_manifest format: one row per image (path, class name(s), split, optional caption)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmkd.evaluation.dataset import DatasetFormatError, EvalDataset, FileImages
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "csv_manifest"
SAMPLE = 50  # rows whose image files the presence check stats (a full stat of 100k files is the loader's job)


class Options(common.SplitOptions):
    manifest: str = "manifest.csv"
    sep: str = ","
    image_col: str = "image"
    image_pattern: str = "{}"  # how a cell becomes a path under the folder, e.g. "images/{}.jpg" (HAM10000 ids)
    label_col: str | None = "label"
    label_cols: list[str] | None = None  # one-hot 0/1 columns, one per class in class order (ISIC, ODIR)
    label_sep: str | None = None  # multilabel: several names in one cell, e.g. "|"
    label_map: dict[str, str | None] = {}  # raw label -> class name; null: not evaluated (e.g. "No Finding")
    split_map: dict[str, str] = {}  # raw split value -> train|val|test (e.g. {valid: val, "1": train})
    split_col: str | None = "split"  # null: no split column, splits drawn from a hash of split_by (or the image)
    split_by: str | None = None  # column hashed for the split (patient / lesion id keeps a patient in one split)
    caption_col: str | None = "caption"


def _required(entry: CatalogEntry) -> list[str]:
    o: Options = entry.opts
    cols = [o.image_col] + ([o.split_col] if o.split_col else []) + ([o.split_by] if o.split_by else [])
    if entry.classes:
        cols += o.label_cols or [o.label_col]
    if "retrieval" in entry.tasks and o.caption_col:
        cols.append(o.caption_col)
    return [c for c in cols if c]


def _integral(t: str) -> str:
    """"2.0" -> "2": grades written by pandas as floats still find an integer-keyed label_map."""
    try:
        x = float(t)
    except ValueError:
        return t
    return str(int(x)) if x.is_integer() else t


def _labels(row: dict, entry: CatalogEntry, index: dict[str, int]) -> np.ndarray | int | str:
    """Class index (single-label), 0/1 row (multilabel), or the reason the row is refused."""
    o: Options = entry.opts
    if o.label_cols:
        vals = []
        for c in o.label_cols:
            try:
                v = float(row[c] or 0)
            except ValueError:
                return f"column {c} value '{row[c]}' is not 0/1"
            if v not in (0.0, 1.0):
                return f"column {c} value '{row[c]}' is not 0/1"
            vals.append(int(v))
        if entry.multilabel:
            return np.array(vals, np.int8)
        return vals.index(1) if sum(vals) == 1 else f"{sum(vals)} positive label columns (exactly one expected)"
    raw = row[o.label_col]
    tokens = [t.strip() for t in raw.split(o.label_sep)] if o.label_sep else [raw]
    names = []
    for t in tokens:
        name = o.label_map.get(t, o.label_map.get(_integral(t), t))
        if name is None or (entry.multilabel and name == ""):
            continue  # mapped to "not a class" (e.g. "No Finding" in a multilabel set)
        if name not in index:
            return f"unknown class '{t}'"
        names.append(name)
    if entry.multilabel:
        y = np.zeros(len(index), np.int8)
        y[[index[n] for n in names]] = 1
        return y
    if len(names) != 1:
        return f"label '{raw}' not evaluated" if not names else f"{len(names)} labels in a single-label set"
    return index[names[0]]


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    o: Options = entry.opts
    path = folder / o.manifest
    rows = common.read_table(path, _required(entry), o.sep)
    index = {c: i for i, c in enumerate(entry.classes)}
    want_captions = o.caption_col is not None and o.caption_col in (rows[0] if rows else {})
    paths: dict[Path, int] = {}
    item_image, split, labels, captions, rejected = [], [], [], [], []
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{o.manifest} row {n}"
        cell = row[o.image_col]
        img = folder / o.image_pattern.format(cell)
        if not cell:
            rejected.append((where, "empty image cell"))
            continue
        if not img.is_file():
            rejected.append((f"{where} ({cell})", f"image file not found: {common.rel(img, folder)}"))
            continue
        if o.split_col:
            s = common.map_split(row[o.split_col], o.split_map)
            if s is None:
                rejected.append((f"{where} ({cell})", f"bad split '{row[o.split_col]}' (train|val|test or split_map)"))
                continue
        else:
            s = common.hash_split(row[o.split_by] if o.split_by else cell, o.split_fractions)
        y = _labels(row, entry, index) if entry.classes else 0
        if isinstance(y, str):
            rejected.append((f"{where} ({cell})", y))
            continue
        if want_captions:
            if "retrieval" in entry.tasks and not row[o.caption_col]:
                rejected.append((f"{where} ({cell})", "empty caption"))
                continue
            captions.append(row[o.caption_col])
        item_image.append(paths.setdefault(img, len(paths)))
        split.append(s)
        labels.append(y)
    if not item_image:
        raise DatasetFormatError(f"{path}: no usable rows ({len(rejected)} rejected, e.g. {rejected[:3]})")
    return EvalDataset(
        name=entry.name, modality=common.modality_of(entry), images=FileImages(list(paths)),
        item_image=np.array(item_image), item_split=np.array(split),
        labels=(np.stack(labels) if entry.multilabel else np.array(labels)) if entry.classes else None,
        classes=list(entry.classes) or None, multilabel=entry.multilabel,
        captions=captions if want_captions else None, rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    o: Options = entry.opts
    path = folder / o.manifest
    if not path.is_file():
        return common.missing(entry, path)
    header = common.table_header(path, o.sep)
    lacking = [c for c in _required(entry) if c not in header]
    if lacking:
        return "incomplete", f"{path}: missing column(s) {lacking}"
    rows = common.read_table(path, (), o.sep)
    if not rows:
        return "incomplete", f"{path} has no rows"
    sample = rows[:: max(1, len(rows) // SAMPLE)][:SAMPLE]
    absent = [r[o.image_col] for r in sample if not (folder / o.image_pattern.format(r[o.image_col])).is_file()]
    if absent:
        return "incomplete", f"{len(absent)} of {len(sample)} sampled images missing under {folder} (e.g. {absent[0]})"
    return "present", f"{path}: {len(rows)} rows"
