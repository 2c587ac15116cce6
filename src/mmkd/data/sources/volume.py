"""Owns the volume source: NRRD, MetaImage, NIfTI and DICOM series read with SimpleITK, one record per chosen slice.

Slices are taken in canonical RAS orientation (sitk.DICOMOrient "RAS": index increasing towards patient Right,
Anterior, Superior; the nifti source's as_closest_canonical) and shown as the nifti source shows them. Only the
chosen slice is read where the format streams (MetaImage, NIfTI; a DICOM series file by file); NRRD is read whole,
under volume_max_bytes. Sizes are checked from the header before any voxel is read; one unreadable file or series
is one quarantined record naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mmkd.config import CurateCfg
from mmkd.data.imaging import RecordError, check_size, gray_to_rgb, percentile_window
from mmkd.data.sources import RawRecord, inside, source_root
from mmkd.data.sources import volume_series as series_io
from mmkd.data.sources.dicom import MODALITIES, _Tags, _tidy, _window
from mmkd.data.sources.files import contained, sidecar_caption
from mmkd.data.sources.nifti import AXES, _slices, slice_problem
from mmkd.data.sources.volume_header import SUFFIXES, orientation, plane_shape, read_header, stem, suffix


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    root = source_root(spec, data_root)
    if isinstance(spec.slices, int) and spec.slices < 1:
        raise ValueError(f"source '{spec.name}': slices must be >= 1, got {spec.slices}")
    if spec.caption_template:
        _caption(spec, "name", 0, None)  # a bad template is a config error: fail early
    limits = limits if limits is not None else CurateCfg()
    base = root.parent if root.is_file() else root
    files = [root] if root.is_file() else sorted(p for p in root.glob(spec.pattern or "**/*") if p.is_file())
    heads = []
    for path in files:
        rel = path.relative_to(base).as_posix()
        try:
            if suffix(path) in SUFFIXES:
                yield from _file_records(spec, path, base, rel, limits)
            elif series_io.is_candidate(path):
                if inside(base, rel) is None:  # a symlink pointing outside the root: never opened
                    raise RecordError(f"path escapes the source root: {rel}")
                try:
                    series_io.check_dicom(path, rel)
                except RecordError:
                    if suffix(path) in series_io.SUFFIXES:
                        raise
                    continue  # a README or a detached data file: not ours
                head = series_io.read_slice_header(path, rel, limits)
                if head is not None:
                    heads.append(head)
        except RecordError as exc:
            yield RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel}, problem=str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd file costs its records
            yield RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel},
                            problem=f"unreadable volume file {rel}: {type(exc).__name__}: {exc}")
    for uid, group in series_io.group(heads).items():
        yield from _series_records(spec, uid, group, base, limits)


def _file_records(spec, path: Path, base: Path, rel: str, limits) -> list[RawRecord]:
    rec = RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel})
    try:
        if inside(base, rel) is None:  # a symlink pointing outside the root
            raise RecordError(f"path escapes the source root: {rel}")
        reader = read_header(path, rel, base, limits, spec.volume_max_bytes)
        size = tuple(int(s) for s in reader.GetSize())
        ornt = orientation(reader.GetDirection(), len(size))
        check_size(*plane_shape(size, ornt, spec.axis), limits)
    except RecordError as exc:
        rec.problem = str(exc)
        return [rec]
    src = next(k for k, (a, _) in enumerate(ornt) if a == spec.axis)
    n = size[src]
    slices = _slices(spec.slices, n)
    info = {"shape": list(size), "dtype": sitk.GetPixelIDValueAsString(reader.GetPixelID()),
            "axcodes": "".join("RAS"[a] if s > 0 else "LPI"[a] for a, s in ornt)}
    if problem := slice_problem(slices, n, rel, spec.axis):
        rec.problem = problem
        rec.raw.update(info)
        return [rec]
    try:
        text = sidecar_caption(base, path.with_name(stem(path) + ".txt"), limits, rel)
    except RecordError as exc:
        rec.problem = str(exc)
        return [rec]
    group = _file_group(rel)
    return [RawRecord(spec.name, spec.kind, f"{rel}#axis{spec.axis}-slice{i}", rel,
                      loc={"path": str(path), "rel": rel, "root": str(base), "axis": spec.axis, "slice": i,
                           "window": list(spec.window_percentiles), "max_bytes": spec.volume_max_bytes},
                      caption=text if text is not None else _caption(spec, stem(path), i, None),
                      modality=spec.modality, group=group, raw={"path": rel, "axis": spec.axis, "slice": i, **info})
            for i in slices]


def _series_records(spec, uid: str, heads: list[dict], base: Path, limits) -> list[RawRecord]:
    first = heads[0]["rel"]
    try:
        s = series_io.build(uid, heads)
        ornt = orientation(s.direction, 3)
        check_size(*plane_shape(s.size, ornt, spec.axis), limits)
    except RecordError as exc:
        return [RawRecord(spec.name, spec.kind, first, first, raw={"path": first, "files": len(heads)},
                          problem=str(exc))]
    src = next(k for k, (a, _) in enumerate(ornt) if a == spec.axis)
    n, name = s.size[src], f"{s.folder or '.'}#series-{s.token}"
    slices = _slices(spec.slices, n)
    info = {"files": len(s.slices), "shape": list(s.size), "tags": s.tags,
            "axcodes": "".join("RAS"[a] if d > 0 else "LPI"[a] for a, d in ornt)}
    if problem := slice_problem(slices, n, name, spec.axis):
        return [RawRecord(spec.name, spec.kind, name, first, raw={"path": first, **info}, problem=problem)]
    group = s.patient if spec.volume_group_by == "patient" else s.study
    group = group or s.study or f"series-{s.token}"  # identifiers: curation stores only a keyed token of it
    modality = spec.modality or MODALITIES.get(s.tags.get("Modality", ""))
    try:
        ds = s.header(limits) if spec.caption_template else None
    except Exception as exc:  # noqa: BLE001 - it was read once already: changed on disk since
        return [RawRecord(spec.name, spec.kind, name, first, raw={"path": first, **info},
                          problem=f"unreadable DICOM header of {name}: {type(exc).__name__}: {exc}")]
    recs = []
    for i in slices:
        # the file holding the slice (a reformatted plane crosses them all: the middle one stands for the series)
        k = _stored_index(i, n, ornt[src][1]) if src == 2 else len(s.slices) // 2
        window = s.windows[k] if spec.volume_window == "dicom" else None
        loc = {"path": str(s.slices[k].path), "rel": s.slices[k].rel, "root": str(base), "axis": spec.axis,
               "slice": i, "series": [sl.rel for sl in s.slices], "size": list(s.size),
               "direction": list(s.direction), "window": list(spec.window_percentiles),
               "dicom_window": list(window) if window else None, "invert": s.invert}
        recs.append(RawRecord(spec.name, spec.kind, f"{name}#axis{spec.axis}-slice{i}", s.slices[k].rel, loc=loc,
                              caption=_caption(spec, s.folder or "series", i, s, ds), modality=modality, group=group,
                              raw={"path": s.slices[k].rel, "series": s.token, "axis": spec.axis, "slice": i,
                                   **info}))
    return recs


def _stored_index(i: int, n: int, direction: int) -> int:
    """The stored index of canonical index i along an axis stored in `direction` (+1 / -1) of its RAS axis."""
    return i if direction > 0 else n - 1 - i


def _file_group(rel: str) -> str:
    """The BIDS subject (`sub-XX`) when the path has one, so a subject's volumes share a split; else the file."""
    sub = next((p for p in rel.split("/")[:-1] if p.startswith("sub-")), None)
    return sub or rel[: len(rel) - len(suffix(Path(rel)))]


def _caption(spec, name: str, i: int, series, ds=None) -> str:
    """The template's caption (fields: name, axis, slice, modality, and a series' DICOM keywords, identifiers
    never), else for a series the DICOM source's default from its tags, else empty (a sidecar wins over both)."""
    if spec.caption_template:
        fields = _Fields(name=name, axis=AXES[spec.axis], slice=i, modality=spec.modality or "")
        fields.tags = _Tags(ds) if ds is not None else None
        try:
            return _tidy(spec.caption_template.format_map(fields))
        except (ValueError, IndexError, AttributeError, KeyError) as exc:
            raise ValueError(f"bad volume caption_template {spec.caption_template!r}: {type(exc).__name__}: "
                             f"{exc}") from None
    if series is None:
        return ""
    mod, body, *desc = (series.tags.get(t, "") for t in ("Modality", "BodyPartExamined", "StudyDescription",
                                                         "SeriesDescription"))
    if not (mod or body or any(desc)):
        return ""
    text = f"{mod} image" + (f" of the {body.lower()}" if body else "") + f", {AXES[spec.axis]} slice"
    return _tidy(text + (", " + " ".join(d for d in desc if d) if any(desc) else ""))


class _Fields(dict):
    """The template's own fields, then a series' DICOM keywords (empty for a file volume)."""

    tags = None

    def __missing__(self, keyword: str) -> str:
        return self.tags[keyword] if self.tags is not None else ""


def load_pixels(rec: RawRecord, cfg) -> np.ndarray:
    axis, i = int(rec.loc["axis"]), int(rec.loc["slice"])
    slab = _series_slab(rec, axis, i, cfg) if "series" in rec.loc else _file_slab(rec, axis, i, cfg)
    shown = np.rot90(_canonical_plane(slab, axis))
    dicom_window = rec.loc.get("dicom_window")
    invert = bool(rec.loc.get("invert"))
    if dicom_window:
        c, w, function = dicom_window
        return gray_to_rgb(_window(shown, float(c), float(w), str(function), invert))
    return gray_to_rgb(percentile_window(shown, tuple(rec.loc.get("window", (0.5, 99.5))), invert))


def _file_slab(rec: RawRecord, axis: int, i: int, cfg) -> sitk.Image:
    """The stored volume's slab holding canonical slice i, read alone where the format streams."""
    path = Path(rec.loc["path"])
    if "root" in rec.loc:
        path = contained(rec.loc["root"], rec.loc.get("rel", path), rec.origin)
    if not path.is_file():
        raise RecordError(f"volume file not found: {rec.origin}")
    root = Path(rec.loc.get("root", path.parent))
    reader = read_header(path, rec.origin, root, cfg, int(rec.loc["max_bytes"]))
    size = [int(s) for s in reader.GetSize()]
    ornt = orientation(reader.GetDirection(), len(size))
    check_size(*plane_shape(size, ornt, axis), cfg)
    src = next(k for k, (a, _) in enumerate(ornt) if a == axis)
    if not 0 <= i < size[src]:
        raise RecordError(f"slice {i} out of range ({size[src]} slices along axis {axis})")
    index, extract = [0] * len(size), list(size)
    index[src], extract[src] = _stored_index(i, size[src], ornt[src][1]), 1
    if len(size) == 4:
        extract[3] = 0  # volume 0 of a 4-D image, the dimension collapsed (as the nifti source)
    reader.SetExtractIndex(index)
    reader.SetExtractSize(extract)
    try:
        return reader.Execute()
    except RuntimeError as exc:  # truncated data, bad compressed stream
        raise RecordError(f"cannot read voxels of {rec.origin} (truncated or corrupt?): "
                          f"{' '.join(str(exc).split())[-200:]}") from None


def _series_slab(rec: RawRecord, axis: int, i: int, cfg) -> sitk.Image:
    """The series' slab holding canonical slice i, with the series' direction cosines, read file by file."""
    root = Path(rec.loc["root"])
    paths = [contained(root, rel, rel) for rel in rec.loc["series"]]
    size, direction = tuple(rec.loc["size"]), tuple(rec.loc["direction"])
    ornt = orientation(direction, 3)
    check_size(*plane_shape(size, ornt, axis), cfg)
    src = next(k for k, (a, _) in enumerate(ornt) if a == axis)
    if not 0 <= i < size[src]:
        raise RecordError(f"slice {i} out of range ({size[src]} slices along axis {axis})")
    for p, rel in zip(paths, rec.loc["series"]):
        if not p.is_file():
            raise RecordError(f"DICOM file of the series not found: {rel}")
    arr = series_io.read_plane(paths, size, src, _stored_index(i, size[src], ornt[src][1]))
    slab = sitk.GetImageFromArray(arr)
    slab.SetDirection(direction)
    return slab


def _canonical_plane(slab: sitk.Image, axis: int) -> np.ndarray:
    """The one-voxel-thick slab reoriented to RAS, as the [first, second] in-plane RAS axes (the nifti source's)."""
    arr = sitk.GetArrayFromImage(sitk.DICOMOrient(slab, "RAS")).astype(np.float64)  # [S, A, R] order
    xyz = arr.transpose(2, 1, 0)
    return np.take(xyz, 0, axis=axis)

