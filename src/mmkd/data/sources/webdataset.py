"""Owns WebDataset sources: tar shards of `key.jpg|png|...`, `key.txt`, `key.json` (open_clip, img2dataset, BIOMEDICA).

Members of one sample are grouped by key (the member path up to the first dot of its file name, as
webdataset does). Pixels are read later by byte offset, so enumeration never decodes an image.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from mmkd.data.sources import RawRecord, source_root, take_metadata
from mmkd.data.sources.files import load_pixels  # noqa: F401  (the reader interface)

DECODES_BYTES = True
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


def shard_paths(spec, data_root: Path) -> list[Path]:
    root = source_root(spec, data_root)
    if root.is_file():
        return [root]
    if root.is_dir():
        return sorted(root.glob(spec.pattern or "*.tar"))
    return sorted(Path(root.anchor).glob(str(root.relative_to(root.anchor))))  # a glob in `path`


def split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_records(spec, data_root: Path) -> Iterator[RawRecord]:
    for shard in shard_paths(spec, data_root):
        yield from _shard_records(spec, shard)


def _shard_records(spec, shard: Path) -> Iterator[RawRecord]:
    try:
        tar = tarfile.open(shard, "r:")
    except (tarfile.TarError, OSError) as exc:
        yield RawRecord(spec.name, spec.kind, shard.name, shard.name, raw={"shard": shard.name},
                        problem=f"unreadable tar shard {shard.name}: {exc}")
        return
    with tar:
        current, members = None, {}
        try:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key != current and current is not None:
                    yield _record(spec, shard, tar, current, members)
                    members = {}
                current = key
                members[ext] = m
        except tarfile.TarError as exc:
            yield RawRecord(spec.name, spec.kind, f"{shard.name}:{current}", shard.name, raw={"shard": shard.name},
                            problem=f"tar shard {shard.name} is corrupt after key {current}: {exc}")
        if current is not None:
            yield _record(spec, shard, tar, current, members)


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return tar.extractfile(member).read().decode("utf-8")


def _record(spec, shard: Path, tar: tarfile.TarFile, key: str, members: dict) -> RawRecord:
    cols = {role: spec.columns.get(role, role) for role in ("id", "caption", "modality", "split", "group", "licence")}
    rec = RawRecord(spec.name, spec.kind, f"{shard.name}:{key}", f"{shard.name}:{key}",
                    raw={"shard": shard.name, "key": key, "members": sorted(members)})
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    try:
        meta = json.loads(_text(tar, members["json"])) if "json" in members else {}
        caption = _text(tar, members["txt"]) if "txt" in members else meta.get(cols["caption"])
    except UnicodeDecodeError as exc:
        rec.problem = f"invalid UTF-8 in the caption or metadata of {key} (byte {exc.start})"
        return rec
    except json.JSONDecodeError as exc:
        rec.problem = f"invalid JSON in {key}.json: {exc.msg} (col {exc.colno})"
        return rec
    if not isinstance(meta, dict):
        rec.problem = f"{key}.json must hold an object"
        return rec
    rec.raw["meta"] = meta
    rec.raw["caption"] = caption
    if image_ext is None:
        rec.problem = f"no image member for key {key} (members: {sorted(members)})"
        return rec
    if not isinstance(caption, str):
        rec.problem = f"no caption for key {key} (no .txt member, no '{cols['caption']}' in .json)"
        return rec
    m = members[image_ext]
    rec.caption = caption
    rec.id = str(meta[cols["id"]]) if meta.get(cols["id"]) not in (None, "") else None
    take_metadata(rec, lambda role: meta.get(cols[role]))
    labels = meta.get("labels")
    rec.labels = labels if isinstance(labels, dict) else {}
    rec.loc = {"tar": str(shard), "offset": m.offset_data, "size": m.size, "member": m.name}
    return rec
