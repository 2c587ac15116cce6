"""Owns image-folder sources: images under a root, each with a sidecar caption (`x.png` + `x.txt`, optional `x.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from mmkd.data.sources import RawRecord, inside, source_root, take_metadata
from mmkd.data.sources.files import load_pixels  # noqa: F401  (the reader interface)

DECODES_BYTES = True
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def iter_records(spec, data_root: Path) -> Iterator[RawRecord]:
    root = source_root(spec, data_root)
    for path in sorted(root.glob(spec.pattern or "**/*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        rec = RawRecord(spec.name, spec.kind, rel, rel, raw={"image": rel})
        if inside(root, rel) is None:  # a symlink pointing outside the root
            rec.problem = f"path escapes the source root: {rel} -> {path.resolve()}"
            yield rec
            continue
        caption_file, meta_file = path.with_suffix(".txt"), path.with_suffix(".json")
        try:
            rec.caption = caption_file.read_text(encoding="utf-8") if caption_file.exists() else None
            meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
        except UnicodeDecodeError as exc:
            rec.problem = f"invalid UTF-8 in the sidecar of {rel} (byte {exc.start})"
            yield rec
            continue
        except json.JSONDecodeError as exc:
            rec.problem = f"invalid JSON in {meta_file.name}: {exc.msg}"
            yield rec
            continue
        rec.raw.update(caption=rec.caption, meta=meta)
        if rec.caption is None:
            rec.problem = f"no caption: sidecar {caption_file.name} missing"
            yield rec
            continue
        if isinstance(meta, dict):
            rec.id = str(meta["id"]) if meta.get("id") else None
            take_metadata(rec, meta.get)
            rec.labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
        rec.loc = {"path": str(path), "rel": rel}
        yield rec
