"""Owns what a loaded evaluation dataset is: its images (lazily read) and its items, whatever the on-disk format."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

TASK_TYPES = ("zeroshot", "probe", "retrieval", "vqa", "survival", "mil")
SPLIT_NAMES = ("train", "val", "test")


class DatasetMissing(FileNotFoundError):
    """A catalog dataset is not on disk; the message says where it was looked for and how to get it."""


class DatasetFormatError(ValueError):
    """A dataset's files do not follow its format; the message names the file and the record."""


class ImageSource:
    """Every image a dataset's items refer to, by index; read one at a time, as RGB."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when the images change (the embedding cache's key)."""
        raise NotImplementedError


class FileImages(ImageSource):
    """Image files on disk (PNG, JPEG, TIFF, ...; 16-bit and palette images converted to RGB)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        from mmkd.data.imaging import to_rgb8  # curation's reader: 16-bit windowing, palette, alpha

        try:
            with Image.open(self.paths[i]) as im:
                return Image.fromarray(to_rgb8(im))
        except (OSError, ValueError) as e:
            raise DatasetFormatError(f"image '{self.paths[i]}' cannot be read: {e}") from e

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


class ArrayImages(ImageSource):
    """Images held in one array (MedMNIST's .npz): (N, H, W) grey or (N, H, W, 3) uint8."""

    def __init__(self, array: np.ndarray):
        if array.ndim not in (3, 4):
            raise DatasetFormatError(f"image array of shape {array.shape}: expected (N, H, W) or (N, H, W, C)")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> Image.Image:
        a = np.asarray(self.array[i])
        if a.dtype != np.uint8:
            lo, hi = float(a.min()), float(a.max())
            a = ((a - lo) / (hi - lo or 1.0) * 255).round().astype(np.uint8)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return Image.fromarray(a).convert("RGB")

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.array).tobytes()).hexdigest()[:16]


@dataclass
class EvalDataset:
    """One dataset as the tasks see it. Which fields are set depends on the format:

    - image items (csv_manifest, image_folder, medmnist_npz): item_image, item_split, labels, classes
      (+ captions when the format has them, for retrieval); `multilabel`: labels is (n, C) of 0/1;
    - questions (vqa_json): item_image, item_split, questions, answers, question_types (closed-ended only);
    - bags (survival_table, mil_bags): bags (image indices per bag, or bag_features), bag_ids, and
      time + event (survival) or labels (mil: class index per bag); bag_split when the format declares one.
    `rejected` holds (record, reason) for every record the loader refused: reported, never silently dropped.
    """

    name: str
    modality: str
    images: ImageSource
    item_image: np.ndarray | None = None  # (n,) int: index into images
    item_split: np.ndarray | None = None  # (n,) str: train | val | test
    labels: np.ndarray | None = None  # (n,) int class index, or (n, C) 0/1 when multilabel; mil: per bag
    classes: list[str] | None = None
    multilabel: bool = False
    captions: list[str] | None = None  # (n,) one caption per item (retrieval)
    questions: list[str] | None = None  # vqa: (n,)
    answers: list[str] | None = None  # vqa: (n,), normalised (lower case, stripped)
    question_types: list[str] | None = None  # vqa: (n,)
    bags: list[np.ndarray] | None = None  # survival / mil: image indices of each bag
    bag_features: list[np.ndarray] | None = None  # mil from precomputed patch features (no images)
    feature_encoder: str | None = None  # ... and the encoder that produced them
    bag_ids: list[str] | None = None
    bag_split: np.ndarray | None = None  # (n_bags,) str, when the format declares splits
    time: np.ndarray | None = None  # survival: follow-up time per bag
    event: np.ndarray | None = None  # survival: 1 = event observed, 0 = censored
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def split_mask(self, split: str) -> np.ndarray:
        if self.item_split is None:
            raise DatasetFormatError(f"{self.name}: no item splits")
        return self.item_split == split

    def texts(self) -> list[str]:
        """Every item text a model must embed (captions and questions), without duplicates, in first-seen order."""
        seen: dict[str, None] = {}
        for t in (self.captions or []) + (self.questions or []):
            seen.setdefault(t, None)
        return list(seen)
