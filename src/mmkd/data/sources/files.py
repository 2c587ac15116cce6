"""Owns reading raw bytes under the byte limits: files and tar members by offset, sidecars, containment, inflation."""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from mmkd.config import CurateCfg
from mmkd.data.imaging import RecordError, open_image, to_rgb8
from mmkd.data.sources import RawRecord, inside

_CHUNK = 1 << 20


def per_file_records(spec, root: Path, default_pattern: str, what: str, file_records, limits) -> Iterator[RawRecord]:
    """Each file of a file-per-volume source (a file root, or the files under a folder root matching the source's
    pattern) through `file_records(spec, path, base, rel, limits)`, built whole per file: an exception costs that
    file's records (one quarantined record naming it), never the listing."""
    base = root.parent if root.is_file() else root
    files = [root] if root.is_file() else sorted(p for p in root.glob(spec.pattern or default_pattern) if p.is_file())
    for path in files:
        rel = path.relative_to(base).as_posix()
        try:
            recs = file_records(spec, path, base, rel, limits)
        except Exception as exc:  # noqa: BLE001 - one odd file costs its records
            recs = [RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel},
                              problem=f"unreadable {what} file {rel}: {type(exc).__name__}: {exc}")]
        yield from recs


def limit(limits, name: str) -> int:
    """A byte limit from `limits` (a CurateCfg or anything with the attribute), else CurateCfg's default."""
    value = getattr(limits, name, None)
    return int(value) if value is not None else int(CurateCfg.model_fields[name].default)


def contained(root, path, what: str) -> Path:
    """`path` resolved (symlinks followed) inside `root`, or a RecordError naming `what`."""
    target = inside(Path(root), str(path))
    if target is None:
        raise RecordError(f"path escapes the source root: {what}")
    return target


def read_capped(path: Path, cap: int, knob: str, kind: str, name: str) -> bytes:
    """A regular file's bytes, refused from its size before reading when over `cap` (and never more than cap read)."""
    # O_NONBLOCK: a FIFO planted under the root must not hang the listing; fstat then refuses it
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError(f"not a regular file: {kind} {name}")
        if st.st_size > cap:
            raise RecordError(f"{kind} too large: {name} is {st.st_size} bytes > {knob} {cap}")
        data = fh.read(cap + 1)
    if len(data) > cap:  # it grew after the stat
        raise RecordError(f"{kind} too large: {name} is over {knob} {cap} bytes")
    return data


def sidecar_text(root: Path, path: Path, limits) -> str | None:
    """A sidecar's text (None when there is none), read only inside root and under max_sidecar_bytes."""
    if not (path.exists() or path.is_symlink()):
        return None
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    target = inside(root, rel)
    if target is None:
        raise RecordError(f"path escapes the source root: sidecar {rel}")
    if not target.exists():
        return None
    cap = limit(limits, "max_sidecar_bytes")
    return read_capped(target, cap, "max_sidecar_bytes", "sidecar", rel).decode("utf-8")


def sidecar_caption(root: Path, path: Path, limits, rel: str) -> str | None:
    """sidecar_text for the caption of the record `rel`: invalid UTF-8 is a RecordError naming the record."""
    try:
        return sidecar_text(root, path, limits)
    except UnicodeDecodeError as exc:
        raise RecordError(f"invalid UTF-8 in the caption sidecar of {rel} (byte {exc.start})") from None


def inflated_size(fh, cap: int) -> int:
    """Bytes a raw deflate stream from fh's position inflates to, counted in bounded pieces; > cap stops early."""
    d, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while total <= cap:
        chunk = d.unconsumed_tail or fh.read(_CHUNK)
        if not chunk:
            break
        total += len(d.decompress(chunk, _CHUNK))  # at most 1 MiB out per call: the bomb never lands in memory
        if d.eof:
            break
    return total


def raw_bytes(loc: dict, max_bytes: int | None = None) -> bytes:
    """The bytes a record's pixels come from, refused before reading when over max_file_bytes or outside the root."""
    cap = max_bytes or limit(None, "max_file_bytes")
    if "tar" in loc:
        name = f"tar member {loc.get('member')} of {Path(loc['tar']).name}"
        if "root" in loc:
            contained(loc["root"], loc["tar"], loc.get("rel", Path(loc["tar"]).name))
        if loc["size"] > cap:
            raise RecordError(f"image file too large: {name} is {loc['size']} bytes > max_file_bytes {cap}")
        with open(loc["tar"], "rb") as fh:
            fh.seek(loc["offset"])
            data = fh.read(loc["size"])
        if len(data) != loc["size"]:
            raise RecordError(f"tar member {loc.get('member')} truncated in {Path(loc['tar']).name}")
        return data
    path = Path(loc["path"])
    rel = loc.get("rel", path.name)
    if "root" in loc:
        path = contained(loc["root"], loc.get("rel", path), rel)
    if not path.is_file():
        raise RecordError(f"image file not found: {rel}")
    return read_capped(path, cap, "max_file_bytes", "image file", rel)


def decode_bytes(data: bytes, cfg) -> np.ndarray:
    return to_rgb8(open_image(data, cfg, cfg.allowed_formats), cfg.highbit_percentiles)


def load_pixels(rec, cfg) -> np.ndarray:
    return decode_bytes(raw_bytes(rec.loc, limit(cfg, "max_file_bytes")), cfg)
