"""Owns what the format loaders share: strict options, CSV reading, image listing, hashed splits, status lines."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, field_validator

from mmkd.evaluation.dataset import SPLIT_NAMES, DatasetFormatError, DatasetMissing

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class Options(BaseModel):
    """Base of every format's options: unknown keys are errors (a typo must not silently change a layout)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_fractions(v: dict[str, float]) -> dict[str, float]:
    bad = [k for k in v if k not in SPLIT_NAMES]
    if bad:
        raise ValueError(f"split_fractions keys {bad} not in {list(SPLIT_NAMES)}")
    if any(f < 0 for f in v.values()) or abs(sum(v.values()) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions {v} must be >= 0 and sum to 1")
    return v


class SplitOptions(Options):
    """Options of formats whose records may lack a declared split: it is then drawn from a hash."""

    split_fractions: dict[str, float] = dict(DEFAULT_FRACTIONS)

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        return check_fractions(v)


def hash_split(key: str, fractions: dict[str, float]) -> str:
    """A split drawn from a hash of `key` (a relative path or a patient id): stable across runs and machines."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    acc = 0.0
    present = [s for s in SPLIT_NAMES if fractions.get(s, 0) > 0]
    for s in present:
        acc += fractions[s]
        if u < acc:
            return s
    return present[-1]


def map_split(raw: str, split_map: dict[str, str]) -> str | None:
    s = split_map.get(raw.strip(), raw.strip())
    return s if s in SPLIT_NAMES else None


def read_table(path: Path, required: Iterable[str], sep: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV/TSV as dicts (header required); a missing required column is a format error naming it."""
    if not path.is_file():
        raise DatasetMissing(f"{path} not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=sep)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {missing}; the header has {header}")
        reader.fieldnames = header
        return [{k: (v or "").strip() if isinstance(v, str) else "" for k, v in row.items() if k is not None}
                for row in reader]


def table_header(path: Path, sep: str = ",") -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [h.strip() for h in next(csv.reader(fh, delimiter=sep), [])]


def image_files(folder: Path, exclude: Iterable[str] = ()) -> list[Path]:
    """Image files directly in `folder`, sorted by name (deterministic order), minus names matching `exclude`."""
    if not folder.is_dir():
        return []
    pats = list(exclude)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not any(p.match(g) for g in pats))


def modality_of(entry: CatalogEntry) -> str:
    """The dataset's modality as EvalDataset carries it: the one listed, or "multi" for several."""
    return entry.modalities[0] if len(entry.modalities) == 1 else "multi"


def missing(entry: CatalogEntry, looked: Path) -> tuple[str, str]:
    return "missing", f"looked for {looked}; to get it: {entry.get}"


def rel(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def collect_bags(folder: Path, ids: list[str], bags_file: str, patches_dir: str, exclude: Iterable[str],
                 rejected: list) -> tuple[list[Path], dict[str, list[int]]]:
    """Each id's images, from `bags_file` (id, image rows) when present, else `patches_dir/<id>/`: every image
    path once (the FileImages list) and each id's indices into it. Absent files are rejected records."""
    paths: dict[Path, int] = {}
    bags: dict[str, list[int]] = {i: [] for i in ids}
    listing = folder / bags_file
    if listing.is_file():
        rows = read_table(listing, ("image",))
        id_col = next((c for c in ("patient_id", "bag_id", "slide_id") if c in rows[0]), None) if rows else None
        if rows and id_col is None:
            raise DatasetFormatError(f"{listing}: missing column patient_id or bag_id; the header has {list(rows[0])}")
        for n, row in enumerate(rows, start=2):
            img = folder / row["image"]
            if row[id_col] not in bags:
                continue  # images of ids the label table does not keep
            if not img.is_file():
                rejected.append((f"{bags_file} row {n} ({row['image']})", "image file not found"))
                continue
            bags[row[id_col]].append(paths.setdefault(img, len(paths)))
    else:
        for i in ids:
            for img in image_files(folder / patches_dir / i, exclude):
                bags[i].append(paths.setdefault(img, len(paths)))
    return list(paths), bags
