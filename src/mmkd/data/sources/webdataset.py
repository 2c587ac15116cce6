"""Owns WebDataset sources: tar shards of `key.jpg|png|...`, `key.txt`, `key.json` (open_clip, img2dataset, BIOMEDICA).

Members of one sample are grouped by key (the member path up to the first dot of its file name, as
webdataset does). Pixels are read later by byte offset, so enumeration never decodes an image.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from mmkd.data.imaging import RecordError
from mmkd.data.sources import RawRecord, inside, source_root, take_metadata
from mmkd.data.sources.files import limit, load_pixels  # noqa: F401  (load_pixels: the reader interface)

DECODES_BYTES = True
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


def shard_root(spec, data_root: Path) -> Path:
    """The folder every shard must resolve inside: the source folder, a file's folder, or a glob's fixed part."""
    root = source_root(spec, data_root)
    if root.is_dir() or root.is_file():
        return root if root.is_dir() else root.parent
    fixed = root.parts
    cut = next((i for i, part in enumerate(fixed) if any(ch in part for ch in "*?[")), len(fixed))
    return Path(*fixed[:cut]) if cut else Path(root.anchor)


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


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    base = shard_root(spec, data_root)
    for shard in shard_paths(spec, data_root):
        rel = shard.relative_to(base).as_posix() if shard.is_relative_to(base) else shard.name
        if inside(base, rel) is None:  # a symlinked shard pointing outside the source
            yield RawRecord(spec.name, spec.kind, shard.name, shard.name, raw={"shard": rel},
                            problem=f"path escapes the source root: tar shard {rel}")
            continue
        if not shard.is_file():  # a folder or FIFO named like a shard: tarfile would fail or block on it
            yield RawRecord(spec.name, spec.kind, shard.name, shard.name, raw={"shard": rel},
                            problem=f"not a regular file: tar shard {rel}")
            continue
        yield from _shard_records(spec, shard, base, rel, limits)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members, headers only (data is skipped by offset), without tarfile keeping every TarInfo of a shard."""
    while (m := tar.next()) is not None:
        tar.members.clear()  # tarfile appends each header to a list: a million-member shard would stay in RAM
        yield m


def _shard_records(spec, shard: Path, base: Path, rel: str, limits) -> Iterator[RawRecord]:
    try:
        tar = tarfile.open(shard, "r:")
    except (tarfile.TarError, OSError) as exc:
        yield RawRecord(spec.name, spec.kind, shard.name, shard.name, raw={"shard": shard.name},
                        problem=f"unreadable tar shard {shard.name}: {exc}")
        return
    loc = {"tar": str(shard), "rel": rel, "root": str(base)}
    with tar:
        current, members = None, {}
        try:
            for m in _members(tar):
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key != current and current is not None:
                    yield _safe_record(spec, shard, tar, current, members, loc, limits)
                    members = {}
                current = key
                members[ext] = m
        except (tarfile.TarError, OSError) as exc:
            yield RawRecord(spec.name, spec.kind, f"{shard.name}:{current}", shard.name, raw={"shard": shard.name},
                            problem=f"tar shard {shard.name} is corrupt after key {current}: {exc}")
        if current is not None:
            yield _safe_record(spec, shard, tar, current, members, loc, limits)


def _safe_record(spec, shard: Path, tar, key: str, members: dict, loc: dict, limits) -> RawRecord:
    try:
        return _record(spec, shard, tar, key, members, loc, limits)
    except Exception as exc:  # one odd sample costs its record, never the shard
        return RawRecord(spec.name, spec.kind, f"{shard.name}:{key}", f"{shard.name}:{key}",
                         raw={"shard": shard.name, "key": key, "members": sorted(members)},
                         problem=f"unreadable tar sample {key} in {shard.name}: {type(exc).__name__}: {exc}")


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path, cap: int) -> str:
    # the size is the member's tar header: refused before a byte of it is read
    if member.size > cap:
        raise RecordError(f"sidecar too large: tar member {member.name} of {shard.name} is {member.size} bytes "
                          f"> max_sidecar_bytes {cap}")
    return tar.extractfile(member).read(cap).decode("utf-8")


def _record(spec, shard: Path, tar: tarfile.TarFile, key: str, members: dict, loc: dict, limits) -> RawRecord:
    cols = {role: spec.columns.get(role, role) for role in ("id", "caption", "modality", "split", "group", "licence")}
    rec = RawRecord(spec.name, spec.kind, f"{shard.name}:{key}", f"{shard.name}:{key}",
                    raw={"shard": shard.name, "key": key, "members": sorted(members)})
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    cap = limit(limits, "max_sidecar_bytes")
    try:
        meta = json.loads(_text(tar, members["json"], shard, cap)) if "json" in members else {}
        caption = _text(tar, members["txt"], shard, cap) if "txt" in members else meta.get(cols["caption"])
    except RecordError as exc:
        rec.problem = str(exc)
        return rec
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
    m, max_bytes = members[image_ext], limit(limits, "max_file_bytes")
    if m.size > max_bytes:  # from the tar header: the worker would read it whole
        rec.problem = f"image file too large: tar member {m.name} of {shard.name} is {m.size} bytes > max_file_bytes " \
                      f"{max_bytes}"
        return rec
    rec.caption = caption
    rec.id = str(meta[cols["id"]]) if meta.get(cols["id"]) not in (None, "") else None
    take_metadata(rec, lambda role: meta.get(cols[role]))
    labels = meta.get("labels")
    rec.labels = labels if isinstance(labels, dict) else {}
    rec.loc = {**loc, "offset": m.offset_data, "size": m.size, "member": m.name}
    return rec
