"""Owns curation: open every image, normalise to RGB at one size, de-duplicate, quarantine bad records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from mmkd.progress import progress

from mmkd.config import MODALITIES, CurateCfg
from mmkd.data.manifest import iter_manifest, read_manifest, write_jsonl

SPLITS = ("train", "probe", "test")


class CurationError(RuntimeError):
    """Curation produced nothing usable."""


def _load_image(path: Path, allowed: list[str]) -> Image.Image:
    with Image.open(path) as im:
        if im.format not in allowed:
            raise ValueError(f"format {im.format} not in allowed formats {allowed}")
        im.load()  # force a full decode so truncated files fail here, not in training
        return im.convert("RGB")


def _record_problem(rec: dict) -> str | None:
    if not rec["caption"].strip():
        return "empty caption"
    if rec["modality"] not in MODALITIES:
        return f"unknown modality '{rec['modality']}'"
    if rec["split"] not in SPLITS:
        return f"unknown split '{rec['split']}' (expected one of {list(SPLITS)})"
    return None


def curate(raw_manifest: Path, out_dir: Path, cfg: CurateCfg) -> dict:
    """Write curated/{manifest.jsonl, images_<split>.npy, quarantine.jsonl, summary.json}."""
    raw_manifest, out_dir = Path(raw_manifest), Path(out_dir)
    root = raw_manifest.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.image_size
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    pixels: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    quarantine: list[dict] = []
    seen_ids: dict[str, int] = {}
    seen_hash: dict[str, str] = {}

    def reject(line: int, reason: str, rec: dict | None = None, raw: str | None = None, rid: str | None = None) -> None:
        quarantine.append({"line": line, "id": (rec or {}).get("id", rid), "reason": reason,
                           "record": rec if rec is not None else raw})

    lines = list(iter_manifest(raw_manifest))
    for no, rec, bad in progress(lines, desc="curate", unit="rec"):
        if bad is not None:
            reject(no, bad.reason, raw=bad.raw, rid=bad.record_id)
            continue
        problem = _record_problem(rec)
        if problem:
            reject(no, problem, rec)
            continue
        if rec["id"] in seen_ids:
            reject(no, f"duplicate id (first seen on line {seen_ids[rec['id']]})", rec)
            continue
        path = (root / rec["image"]).resolve()
        if not path.is_file():
            reject(no, f"image file not found: {rec['image']}", rec)
            continue
        try:
            img = _load_image(path, cfg.allowed_formats)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            reject(no, f"unreadable image {rec['image']}: {exc}", rec)
            continue
        arr = np.asarray(img)
        digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
        if digest in seen_hash:
            reject(no, f"duplicate image content of '{seen_hash[digest]}'", rec)
            continue
        seen_ids[rec["id"]] = no
        seen_hash[digest] = rec["id"]
        small = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)
        split = rec["split"]
        kept[split].append({
            "id": rec["id"], "caption": " ".join(rec["caption"].split()), "modality": rec["modality"],
            "labels": rec.get("labels", {}), "split": split, "index": len(pixels[split]),
            "sha256": digest, "image": rec["image"], "orig_width": img.width, "orig_height": img.height,
            "width": size, "height": size,
        })
        pixels[split].append(small)

    n_kept = sum(len(v) for v in kept.values())
    if n_kept == 0:
        raise CurationError(f"{raw_manifest}: no usable records ({len(quarantine)} quarantined)")
    for split in SPLITS:
        arr = np.stack(pixels[split]) if pixels[split] else np.zeros((0, size, size, 3), np.uint8)
        np.save(out_dir / f"images_{split}.npy", arr)
    write_jsonl(out_dir / "manifest.jsonl", [r for s in SPLITS for r in kept[s]])
    write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    reasons: dict[str, int] = {}
    for q in quarantine:
        key = q["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = {"input_lines": len(lines), "kept": n_kept, "quarantined": len(quarantine),
               "kept_per_split": {s: len(kept[s]) for s in SPLITS}, "quarantine_reasons": reasons,
               "image_size": size}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_curated(curated_dir: Path, split: str) -> tuple[list[dict], np.ndarray]:
    """Records of one split (in shard order) and its uint8 image shard, memory-mapped."""
    curated_dir = Path(curated_dir)
    records = [r for r in read_manifest(curated_dir / "manifest.jsonl") if r["split"] == split]
    images = np.load(curated_dir / f"images_{split}.npy", mmap_mode="r")
    if len(records) != len(images):
        raise CurationError(f"{curated_dir}: {split} manifest has {len(records)} rows, shard {len(images)}")
    return records, images
