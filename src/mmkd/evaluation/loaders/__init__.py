"""Owns the registry of on-disk formats: each format's options model, loader and presence check.

A loader is `load(folder: Path, entry: CatalogEntry) -> EvalDataset`; a check is
`check(folder: Path, entry: CatalogEntry) -> (status, detail)`, status one of present | missing | incomplete.
Both read `entry.opts`, the entry's `options` validated by the format's `Options` model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from mmkd.evaluation.loaders import (
    csv_manifest,
    image_folder,
    medmnist_npz,
    mil_bags,
    survival_table,
    vqa_json,
)

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry
    from mmkd.evaluation.dataset import EvalDataset


@dataclass(frozen=True)
class Format:
    options: type[BaseModel]
    load: Callable[[Path, CatalogEntry], EvalDataset]
    check: Callable[[Path, CatalogEntry], tuple[str, str]]


FORMATS: dict[str, Format] = {
    m.NAME: Format(m.Options, m.load, m.check)
    for m in (csv_manifest, image_folder, medmnist_npz, vqa_json, survival_table, mil_bags)
}
LOADERS = {name: f.load for name, f in FORMATS.items()}
IMAGE_FORMATS = ("csv_manifest", "image_folder", "medmnist_npz")  # one labelled image per item
