"""Owns image-folder sources: images under a root, each with a sidecar caption (`x.png` + `x.txt`, optional `x.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from mmkd.data.imaging import RecordError
from mmkd.data.sources import RawRecord, inside, source_root, take_metadata
from mmkd.data.sources.files import load_pixels, sidecar_text  # noqa: F401  (load_pixels: the reader interface)

DECODES_BYTES = True
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    root = source_root(spec, data_root)
    for path in sorted(root.glob(spec.pattern or "**/*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        try:
            yield _record(spec, root, path, rel, limits)
        except Exception as exc:  # one odd file costs its record, never the listing
            yield RawRecord(spec.name, spec.kind, rel, rel, raw={"image": rel},
                            problem=f"unreadable folder entry {rel}: {type(exc).__name__}: {exc}")


def _record(spec, root: Path, path: Path, rel: str, limits) -> RawRecord:
    rec = RawRecord(spec.name, spec.kind, rel, rel, raw={"image": rel})
    if inside(root, rel) is None:  # a symlink pointing outside the root
        rec.problem = f"path escapes the source root: {rel}"
        return rec
    caption_file, meta_file = path.with_suffix(".txt"), path.with_suffix(".json")
    try:
        rec.caption = sidecar_text(root, caption_file, limits)
        meta_text = sidecar_text(root, meta_file, limits)
        meta = json.loads(meta_text) if meta_text is not None else {}
    except RecordError as exc:
        rec.problem = str(exc)
        return rec
    except UnicodeDecodeError as exc:
        rec.problem = f"invalid UTF-8 in the sidecar of {rel} (byte {exc.start})"
        return rec
    except json.JSONDecodeError as exc:
        rec.problem = f"invalid JSON in {meta_file.name}: {exc.msg}"
        return rec
    rec.raw.update(caption=rec.caption, meta=meta)
    if rec.caption is None:
        rec.problem = f"no caption: sidecar {caption_file.name} missing"
        return rec
    if isinstance(meta, dict):
        rec.id = str(meta["id"]) if meta.get("id") else None
        take_metadata(rec, meta.get)
        rec.labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    rec.loc = {"path": str(path), "rel": rel, "root": str(root)}
    return rec
