"""Owns the NIfTI source: one record per chosen slice of each volume, canonical (RAS) orientation, windowed.

Every file is read inside the source root, its header extensions walked under max_header_bytes before
nibabel loads them, and one unreadable file becomes one quarantined record.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from mmkd.data.imaging import RecordError, check_size, gray_to_rgb, percentile_window
from mmkd.data.sources import RawRecord, inside, source_root
from mmkd.data.sources.files import per_file_records, contained, limit, sidecar_caption

AXES = ("sagittal", "coronal", "axial")


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    root = source_root(spec, data_root)
    if isinstance(spec.slices, int) and spec.slices < 1:
        raise ValueError(f"source '{spec.name}': slices must be >= 1, got {spec.slices}")
    if spec.caption_template:
        _format(spec, "name", 0)  # a bad template is a config error: fail early
    yield from per_file_records(spec, root, "**/*.nii*", "NIfTI", _file_records, limits)


def check_header(path: Path, name: str, limits) -> None:
    """Refuse a header whose extensions exceed max_header_bytes before nibabel reads them (it reads each one whole,
    whatever vox_offset says), walking the extension sizes in a stream (a .nii.gz is inflated in pieces)."""
    cap = limit(limits, "max_header_bytes")
    with nib.openers.ImageOpener(path) as fh:
        head = fh.read(544)
        endian = next((e for e in "<>" if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] in (348, 540)), None)
        if endian is None:
            return  # not a NIfTI header: nib.load names what it is
        n1 = struct.unpack(endian + "i", head[:4])[0] == 348
        size, magic = (348, head[344:347]) if n1 else (540, head[4:7])
        if magic not in (b"n+1", b"ni1", b"n+2", b"ni2") or len(head) < size + 4 or head[size] == 0:
            return  # Analyze (no extensions), truncated (nibabel says so), or no extension flag
        vox = struct.unpack(endian + ("f" if n1 else "q"), head[108:112] if n1 else head[168:176])[0]
        # as nibabel: a single file's extensions end at vox_offset, a detached .hdr's at its end
        left = -1 if ".hdr" in path.name.lower() else vox - size - 4
        fh.seek(size + 4)
        total = size + 4
        while left >= 16 or left < 0:  # nibabel's own loop
            ext = fh.read(8)
            if len(ext) < 8:
                return
            esize = struct.unpack(endian + "i", ext[:4])[0]
            if esize < 8:  # nibabel would read(esize - 8): a negative size reads the rest of the file
                raise RecordError(f"bad NIfTI header extension: {name} has an extension of size {esize}")
            total += esize
            if total > cap:
                raise RecordError(f"NIfTI header too large: {name} has extensions past max_header_bytes {cap}")
            fh.seek(esize - 8, 1)
            left -= esize


def stem(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)


def _file_records(spec, path: Path, base: Path, rel: str, limits) -> list[RawRecord]:
    rec = RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel})
    try:
        if inside(base, rel) is None:  # a symlink pointing outside the root
            raise RecordError(f"path escapes the source root: {rel}")
        check_header(path, rel, limits)
        img = nib.load(path)  # the header only; voxels stay on disk
        shape = tuple(int(s) for s in img.shape)
    except RecordError as exc:
        rec.problem = str(exc)
        return [rec]
    except Exception as exc:  # not NIfTI, truncated header, bad gzip
        rec.problem = f"not a NIfTI file: {rel} ({type(exc).__name__}: {exc})"
        return [rec]
    if len(shape) < 3:
        rec.problem = f"not a volume: {rel} has shape {shape} (need 3-D or 4-D)"
        return [rec]
    src, _ = _source_axis(img, spec.axis)
    n = shape[src]
    slices = _slices(spec.slices, n)
    info = {"shape": list(shape), "dtype": str(img.get_data_dtype()), "axcodes": "".join(nib.aff2axcodes(img.affine))}
    if problem := slice_problem(slices, n, rel, spec.axis):
        rec.problem = problem
        rec.raw.update(info)
        return [rec]
    try:
        text = sidecar_caption(base, path.with_name(stem(path) + ".txt"), limits, rel)
    except RecordError as exc:
        rec.problem = str(exc)
        return [rec]
    recs = []
    for i in slices:
        caption = text if text is not None else (_format(spec, stem(path), i) if spec.caption_template else "")
        loc = {"path": str(path), "axis": spec.axis, "slice": i, "window": list(spec.window_percentiles),
               "rel": rel, "root": str(base)}
        recs.append(RawRecord(spec.name, spec.kind, f"{rel}#axis{spec.axis}-slice{i}", rel, loc=loc, caption=caption,
                              modality=spec.modality, group=_group(rel),
                              raw={"path": rel, "axis": spec.axis, "slice": i, **info}))
    return recs


def slice_problem(slices: list[int], n: int, name: str, axis: int) -> str | None:
    """Why the chosen slices cannot be taken from a volume of n slices along axis, or None."""
    bad = [i for i in slices if not 0 <= i < n]
    return f"slice indices {bad} out of range for {name} ({n} slices along axis {axis})" if bad else None


def _slices(slices, n: int) -> list[int]:
    if slices == "middle":
        return [n // 2]
    if isinstance(slices, int):  # N evenly spaced over the central 80% (the edges are mostly background)
        lo, hi = 0.1 * (n - 1), 0.9 * (n - 1)
        return sorted({round(lo + (hi - lo) * (k + 0.5) / slices) for k in range(slices)})
    return list(slices)


def _group(rel: str) -> str:
    """The BIDS subject (`sub-XX`) when the path has one, so a subject's volumes share a split; else the file."""
    parts = rel.split("/")
    sub = next((p for p in parts[:-1] if p.startswith("sub-")), None)
    return sub or re.sub(r"\.nii(\.gz)?$", "", rel, flags=re.IGNORECASE)


def _format(spec, name: str, i: int) -> str:
    fields = {"name": name, "axis": AXES[spec.axis], "slice": i, "modality": spec.modality or ""}
    try:
        return " ".join(spec.caption_template.format(**fields).split())
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise ValueError(f"bad NIfTI caption_template {spec.caption_template!r} (fields: {sorted(fields)}): "
                         f"{type(exc).__name__}: {exc}") from None


def _source_axis(img, axis: int) -> tuple[int, int]:
    """(stored axis, direction) that canonical RAS `axis` comes from (what as_closest_canonical would do)."""
    ornt = _orientation(img)
    src = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    return src, int(ornt[src, 1])


def _orientation(img) -> np.ndarray:
    """Per stored axis: (RAS axis, +1/-1); the stored order when the affine is degenerate."""
    ornt = nib.io_orientation(img.affine)[:3]
    return np.array([[0, 1], [1, 1], [2, 1]]) if np.isnan(ornt).any() else ornt


def load_pixels(rec: RawRecord, cfg) -> np.ndarray:
    path, axis, i = Path(rec.loc["path"]), int(rec.loc["axis"]), int(rec.loc["slice"])
    if "root" in rec.loc:
        path = contained(rec.loc["root"], rec.loc.get("rel", path), rec.origin)
    if not path.is_file():
        raise RecordError(f"NIfTI file not found: {rec.origin}")
    check_header(path, rec.origin, cfg)
    try:
        img = nib.load(path)
    except Exception as exc:
        raise RecordError(f"not a NIfTI file: {rec.origin} ({type(exc).__name__}: {exc})") from None
    plane = _canonical_slice(img, axis, i, cfg)
    return gray_to_rgb(percentile_window(np.rot90(plane), tuple(rec.loc.get("window", (0.5, 99.5)))))


def _canonical_slice(img, axis: int, i: int, cfg) -> np.ndarray:
    """Slice i along canonical axis `axis`, read lazily from the stored array (volume 0 of a 4-D image)."""
    shape = img.shape
    ornt = _orientation(img)
    src, direction = _source_axis(img, axis)
    rest = [a for a in range(3) if a != src]
    check_size(shape[rest[0]], shape[rest[1]], cfg)  # rot90 puts the first in-plane axis along the width
    if not 0 <= i < shape[src]:
        raise RecordError(f"slice {i} out of range ({shape[src]} slices along axis {axis})")
    index = [slice(None)] * 3 + [0] * (len(shape) - 3)
    index[src] = i if direction > 0 else shape[src] - 1 - i
    try:
        plane = np.asarray(img.dataobj[tuple(index)], dtype=np.float64)
    except Exception as exc:  # truncated data, bad gzip stream
        raise RecordError(f"cannot read NIfTI voxels (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    # reorder the two stored in-plane axes into canonical order, flipping those stored L/P/I
    if ornt[rest[0], 0] > ornt[rest[1], 0]:
        plane, rest = plane.T, rest[::-1]
    for k, a in enumerate(rest):
        if ornt[a, 1] < 0:
            plane = np.flip(plane, axis=k)
    return plane
