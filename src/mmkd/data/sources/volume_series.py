"""Owns DICOM series for the volume source: files grouped by SeriesInstanceUID, ordered by position, read per file.

Headers are read with pydicom under the DICOM source's limits (no pixel data); a series becomes one volume whose
stored axes are (columns, rows, slice normal), the slices sorted by ImagePositionPatient projected on the normal.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from mmkd.data.imaging import RecordError
from mmkd.data.sources.dicom import read_header
from mmkd.data.sources.dicom_objects import needs_force, refusal

SUFFIXES = (".dcm", ".dicom", ".ima")
DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index of a file-set, not an image
_TOL = 1e-3                         # direction cosines agreeing to this are one orientation


@dataclass
class Slice:
    rel: str
    path: Path
    position: float = 0.0


@dataclass
class Series:
    """One series: its files in slice order and what the volume source needs from their headers."""

    uid: str
    slices: list[Slice]
    size: tuple[int, int, int]          # (columns, rows, slices): the stored axes
    direction: tuple[float, ...]        # 3x3 row-major, columns = stored axes' directions (LPS), as SimpleITK's
    windows: list                       # per slice: (center, width, function) or None
    invert: bool                        # MONOCHROME1
    tags: dict = field(default_factory=dict)   # Modality, BodyPartExamined, descriptions: never identifiers
    patient: str | None = None
    study: str | None = None

    @property
    def folder(self) -> str:
        """The folder holding the series' files (their common parent), relative to the source root."""
        parents = {Path(s.rel).parent.as_posix() for s in self.slices}
        common = os.path.commonpath(sorted(parents)) if len(parents) > 1 else parents.pop()
        return "" if common == "." else common

    def header(self, limits):
        """The middle slice's dataset without pixels (a caption template's DICOM keywords), read when asked: a
        listing keeps no dataset per file."""
        mid = self.slices[len(self.slices) // 2]
        return read_header(mid.path, mid.rel, limits)

    @property
    def token(self) -> str:
        """A short, stable name for the series in record keys (a hash: UIDs stay out of keys)."""
        return hashlib.blake2b(self.uid.encode(), digest_size=6).hexdigest()


def is_candidate(path: Path) -> bool:
    """A file that may be DICOM: a DICOM suffix, none at all, or a numeric one (UID-named files)."""
    suffix = path.suffix.lower()
    return suffix in SUFFIXES or suffix == "" or suffix[1:].isdigit()


def check_dicom(path: Path, rel: str) -> None:
    """A RecordError unless the file is a DICOM data set: the 'DICM' prefix after the preamble, or a data set from
    byte 0 (old exports; the dicom source's test). A FIFO or device is never opened for reading."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise RecordError(f"not a regular file: {rel}")
    with open(path, "rb") as fh:
        needs_force(fh.read(132), rel)


def _float_list(value, n: int, what: str, rel: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in (value if isinstance(value, (list, MultiValue)) else [value])])
    except (TypeError, ValueError):
        raise RecordError(f"bad {what} in DICOM file {rel}: {str(value)[:60]!r}") from None
    if out.size != n or not np.isfinite(out).all():
        raise RecordError(f"bad {what} in DICOM file {rel}: {str(value)[:60]!r}")
    return out


def _window(ds):
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    c, w = (float(v[0] if isinstance(v, MultiValue) else v) for v in (c, w))
    return (c, w, str(ds.get("VOILUTFunction", "LINEAR"))) if w > 0 else None


def read_slice_header(path: Path, rel: str, limits) -> dict | None:
    """What grouping needs from one file (None for a DICOMDIR); a RecordError names what is wrong with it."""
    try:
        ds = read_header(path, rel, limits)
    except InvalidDicomError:
        raise RecordError(f"not a DICOM file: {rel} (no DICM prefix / file meta header)") from None
    except RecordError:
        raise
    except Exception as exc:  # truncated or garbled header
        raise RecordError(f"unreadable DICOM header: {rel}: {type(exc).__name__}: {exc}") from None
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR:
        return None
    # the DICOM source's rules: SEG, RTSTRUCT, SR, ... are no images; burned-in text per curate.dicom_burned_in
    why = refusal(ds, rel, getattr(limits, "dicom_burned_in", None) or "refuse", None)
    if why:
        raise RecordError(why)
    if "Rows" not in ds or "Columns" not in ds:
        raise RecordError(f"no image in DICOM file {rel}: no Rows/Columns (Modality {ds.get('Modality', '?')})")
    if int(float(ds.get("NumberOfFrames") or 1)) > 1:
        raise RecordError(f"multi-frame DICOM file {rel}: not part of a series of single images "
                          "(read it with the dicom source's frames)")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise RecordError(f"colour DICOM file {rel} ({ds.get('PhotometricInterpretation')}): a volume is grey")
    uid = str(ds.get("SeriesInstanceUID") or "")
    if not uid:
        raise RecordError(f"no SeriesInstanceUID in DICOM file {rel}")
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise RecordError(f"no ImagePositionPatient/ImageOrientationPatient in DICOM file {rel}: "
                          "its place in the volume is unknown")
    return {"uid": uid, "rel": rel, "path": path, "size": (int(ds.Columns), int(ds.Rows)),
            "iop": _float_list(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", rel),
            "ipp": _float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient", rel),
            "window": _window(ds), "invert": str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1",
            "patient": str(ds.get("PatientID") or "") or None, "study": str(ds.get("StudyInstanceUID") or "") or None,
            "tags": {t: str(ds.get(t) or "") for t in ("Modality", "BodyPartExamined", "StudyDescription",
                                                        "SeriesDescription")}}


def build(uid: str, heads: list[dict]) -> Series:
    """The series' volume from its files' headers: one orientation and size, distinct positions along the normal."""
    first = heads[0]
    where = f"series {hashlib.blake2b(uid.encode(), digest_size=6).hexdigest()} ({first['rel']} and " \
            f"{len(heads) - 1} more)"
    if len(heads) < 2:
        raise RecordError(f"not a volume: {where} has a single image (2-D: use the dicom source)")
    for h in heads[1:]:
        if h["size"] != first["size"]:
            raise RecordError(f"not one volume: {where}: {h['rel']} is {h['size']} pixels, "
                              f"{first['rel']} {first['size']}")
        if np.abs(h["iop"] - first["iop"]).max() > _TOL:
            raise RecordError(f"not one volume: {where}: {h['rel']} has another ImageOrientationPatient than "
                              f"{first['rel']} (a localizer?)")
    row, col = first["iop"][:3], first["iop"][3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 0.5:
        raise RecordError(f"bad ImageOrientationPatient in {first['rel']}: row and column are parallel")
    normal /= np.linalg.norm(normal)
    pos = [float(h["ipp"] @ normal) for h in heads]
    order = sorted(range(len(heads)), key=lambda k: (pos[k], heads[k]["rel"]))
    gaps = np.diff([pos[k] for k in order])
    if (np.abs(gaps) < _TOL).any():
        k = order[int(np.flatnonzero(np.abs(gaps) < _TOL)[0])]
        raise RecordError(f"not one volume: {where}: several images at the position of {heads[k]['rel']} "
                          "(a 4-D or multi-echo series)")
    direction = np.stack([row, col, normal], axis=1)  # columns: the stored axes' directions
    mid = heads[order[len(order) // 2]]
    return Series(uid, [Slice(heads[k]["rel"], heads[k]["path"], pos[k]) for k in order],
                  (*first["size"], len(heads)), tuple(float(v) for v in direction.ravel()),
                  [heads[k]["window"] for k in order], first["invert"], dict(mid["tags"]),
                  first["patient"], first["study"])


def group(heads: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for h in heads:
        out.setdefault(h["uid"], []).append(h)
    return out


def read_plane(paths: list[Path], size: tuple[int, int, int], stored_axis: int, index: int) -> np.ndarray:
    """The stored slab (SimpleITK [z, y, x] order, one voxel thick along `stored_axis`), reading one file at a time:
    the file at `index` along the slice axis, or one row / column of every file for a reformatted plane."""
    def pixels(path: Path) -> np.ndarray:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")  # named: ITK would not pick it for a file without the preamble
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        got = tuple(int(s) for s in reader.GetSize())[:2]
        if got != size[:2] or reader.GetNumberOfComponents() != 1:
            raise RecordError(f"DICOM file {path.name} changed since listing: {got} pixels, expected {size[:2]}")
        try:  # the modality LUT (RescaleSlope/Intercept) is applied by GDCM: values in HU for CT
            return sitk.GetArrayFromImage(reader.Execute()).reshape(size[1], size[0]).astype(np.float64)
        except RuntimeError as exc:
            raise RecordError(f"cannot read DICOM pixels of {path.name} (truncated or corrupt?): "
                              f"{' '.join(str(exc).split())[-200:]}") from None

    if stored_axis == 2:
        return pixels(paths[index])[None]
    if stored_axis == 1:  # one row per file: [z, 1, x]
        return np.stack([pixels(p)[index].copy() for p in paths])[:, None, :]
    return np.stack([pixels(p)[:, index].copy() for p in paths])[:, :, None]  # one column per file: [z, y, 1]
