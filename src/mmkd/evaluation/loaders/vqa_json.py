"""Owns the vqa_json format: SLAKE's per-split JSON lists, or VQA-RAD's single JSON; closed English questions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from mmkd.evaluation.dataset import (
    DatasetFormatError,
    DatasetMissing,
    EvalDataset,
    FileImages,
)
from mmkd.evaluation.loaders import common

if TYPE_CHECKING:
    from mmkd.evaluation.catalog import CatalogEntry

NAME = "vqa_json"
SLAKE_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
FIELDS = {"slake": ("img_name", "question", "answer", "answer_type", "content_type"),
          "vqa_rad": ("image_name", "question", "answer", "answer_type", "question_type", "phrase_type")}
OPEN = "open-ended: not evaluated (closed-ended questions only)"
FOREIGN = "not English: not evaluated"


class Options(common.Options):
    layout: Literal["slake", "vqa_rad"] = "slake"
    file: str = "VQA_RAD Dataset Public.json"  # vqa_rad: the one JSON file
    image_dir: str | None = None  # default: imgs (slake), "VQA_RAD Image Folder" (vqa_rad)
    language: str = "en"  # slake's q_lang kept


def _image_dir(o: Options) -> str:
    return o.image_dir or ("imgs" if o.layout == "slake" else "VQA_RAD Image Folder")


def _files(folder: Path, o: Options) -> list[tuple[str | None, Path]]:
    """(split, file) pairs that exist; vqa_rad's split is per record (None here)."""
    if o.layout == "vqa_rad":
        return [(None, folder / o.file)] if (folder / o.file).is_file() else []
    out = []
    for split, names in SLAKE_FILES.items():
        found = [folder / n for n in names if (folder / n).is_file()]
        if found:
            out.append((split, found[0]))
    return out


def _records(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetFormatError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of questions, found {type(data).__name__}")
    return data


def load(folder: Path, entry: CatalogEntry) -> EvalDataset:
    o: Options = entry.opts
    files = _files(folder, o)
    if not files:
        raise DatasetMissing(f"no question file under {folder}")
    img_root = folder / _image_dir(o)
    rad = o.layout == "vqa_rad"
    img_key, type_key = ("image_name", "question_type") if rad else ("img_name", "content_type")
    paths: dict[Path, int] = {}
    item_image, split, questions, answers, qtypes, rejected = [], [], [], [], [], []
    for file_split, path in files:
        skipped: Counter = Counter()
        for i, r in enumerate(_records(path)):
            where = f"{path.name} #{i}" + (f" (qid {r['qid']})" if isinstance(r, dict) and "qid" in r else "")
            lacking = [k for k in FIELDS[o.layout] if not isinstance(r, dict) or k not in r]
            if lacking:
                rejected.append((where, f"missing field(s) {lacking}"))
                continue
            if not rad and str(r.get("q_lang", o.language)).strip().lower() != o.language:
                skipped[FOREIGN] += 1
                continue
            if str(r["answer_type"]).strip().upper() != "CLOSED":
                skipped[OPEN] += 1
                continue
            img = img_root / str(r[img_key])
            if not img.is_file():
                rejected.append((where, f"image file not found: {common.rel(img, folder)}"))
                continue
            answer = str(r["answer"]).strip().lower()
            if not answer or not str(r["question"]).strip():
                rejected.append((where, "empty question or answer"))
                continue
            item_image.append(paths.setdefault(img, len(paths)))
            split.append(file_split or ("test" if str(r["phrase_type"]).startswith("test") else "train"))
            questions.append(str(r["question"]).strip())
            answers.append(answer)
            qtypes.append(str(r[type_key]).strip() or "unknown")
        # open-ended / other-language questions are counted in one line per file, not listed one by one
        rejected += [(f"{path.name}: {n} questions", reason) for reason, n in sorted(skipped.items())]
    if not item_image:
        raise DatasetFormatError(f"{folder}: no closed-ended questions with images ({rejected[:3]})")
    return EvalDataset(name=entry.name, modality=common.modality_of(entry), images=FileImages(list(paths)),
                       item_image=np.array(item_image), item_split=np.array(split), questions=questions,
                       answers=answers, question_types=qtypes, rejected=rejected)


def check(folder: Path, entry: CatalogEntry) -> tuple[str, str]:
    o: Options = entry.opts
    files = _files(folder, o)
    if not files:
        return common.missing(entry, folder / (o.file if o.layout == "vqa_rad" else "train.json"))
    lacking = [] if (folder / _image_dir(o)).is_dir() else [_image_dir(o)]
    if o.layout == "slake":
        lacking += [SLAKE_FILES[s][0] for s in ("train", "test") if s not in dict(files)]
    if lacking:
        return "incomplete", f"under {folder}: missing {lacking}"
    return "present", ", ".join(str(p) for _, p in files)
