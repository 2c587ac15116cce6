"""Owns the image_folder format: `<split>/<class>/<image>`, or `<class>/<image>` with hashed splits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import field_validator

from mmkd.evaluation.dataset import (
    SPLIT_NAMES,
    DatasetFormatError,
    DatasetMissing,
    EvalDataset,
    FileImages,
)
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "image_folder"


class Options(common.SplitOptions):
    # split -> folder (may be nested: {train: OCT2017/train}); null: no split folders, splits from a path hash
    split_dirs: dict[str, str] | None = None
    class_dirs: dict[str, str] = {}  # class -> folder under the split folder (may be nested); default: its name
    exclude: list[str] = []  # file-name globs that are not samples (e.g. BUSI's "*_mask*.png")

    @field_validator("split_dirs")
    @classmethod
    def _splits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        bad = [s for s in v or {} if s not in SPLIT_NAMES]
        if bad:
            raise ValueError(f"split_dirs keys {bad} not in {list(SPLIT_NAMES)}")
        return v


def _roots(folder: Path, o: Options) -> list[tuple[str | None, Path]]:
    if o.split_dirs is None:
        return [(None, folder)]
    return [(s, folder / o.split_dirs[s]) for s in SPLIT_NAMES if s in o.split_dirs]


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    o: Options = entry.opts
    roots = _roots(folder, o)
    if not any(r.is_dir() for _, r in roots):
        raise DatasetMissing(f"none of {[str(r) for _, r in roots]} exists")
    paths, split, labels, rejected = [], [], [], []
    for s, root in roots:
        if not root.is_dir():
            rejected.append((common.rel(root, folder), f"split folder for '{s}' not found"))
            continue
        for k, cls in enumerate(entry.classes):
            d = root / o.class_dirs.get(cls, cls)
            files = common.image_files(d, o.exclude)
            if not files:
                rejected.append((common.rel(d, folder), f"class '{cls}': folder missing or without images"))
            for f in files:
                paths.append(f)
                split.append(s or common.hash_split(common.rel(f, folder), o.split_fractions))
                labels.append(k)
    if not paths:
        raise DatasetFormatError(f"{folder}: no images found for classes {entry.classes} ({rejected[:3]})")
    return EvalDataset(name=entry.name, modality=common.modality_of(entry), images=FileImages(paths),
                       item_image=np.arange(len(paths)), item_split=np.array(split), labels=np.array(labels),
                       classes=list(entry.classes), rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    o: Options = entry.opts
    roots = _roots(folder, o)
    if not any(r.is_dir() for _, r in roots):
        return common.missing(entry, roots[0][1])
    lacking = [common.rel(r, folder) for _, r in roots if not r.is_dir()]
    lacking += [common.rel(r / o.class_dirs.get(c, c), folder) for _, r in roots if r.is_dir()
                for c in entry.classes if not (r / o.class_dirs.get(c, c)).is_dir()]
    if lacking:
        return "incomplete", f"under {folder}: missing {lacking[:5]}" + (" ..." if len(lacking) > 5 else "")
    return "present", f"{folder}: {len(roots)} split folder(s) x {len(entry.classes)} classes"
