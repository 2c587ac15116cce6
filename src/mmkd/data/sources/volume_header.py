"""Owns a volume file's header for the volume source: what it is, its orientation, and the checks made before a read.

NIfTI headers are walked by the nifti source's check; NRRD / MetaImage text headers are bounded by max_header_bytes
and a detached data file they name must lie inside the source root.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mmkd.data.imaging import RecordError
from mmkd.data.sources import inside
from mmkd.data.sources.files import limit
from mmkd.data.sources.nifti import check_header

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".nii", ".nii.gz")
STREAMED = (".mha", ".mhd", ".nii", ".nii.gz")  # ITK reads only the requested region (measured: docs/benchmarks.md)
_SCALAR = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
           sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64}
_RAS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem(path: Path) -> str:
    return path.name[: len(path.name) - len(suffix(path))]


def orientation(direction, dim: int) -> list[tuple[int, int]]:
    """Per stored axis: (RAS axis, +1/-1), SimpleITK's own closest-axis reading of the direction cosines."""
    m = np.array(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(tuple(m.ravel()))
    # ITK 5.4 names each axis by where its index goes (identity cosines: "LPS", +x towards patient Left)
    out = [_RAS[c] for c in code]
    if sorted(a for a, _ in out) != [0, 1, 2]:
        raise RecordError(f"direction cosines {tuple(np.round(m.ravel(), 3))} map no axis to each of R, A, S")
    return out


def plane_shape(size, ornt, axis: int) -> tuple[int, int]:
    """(width, height) of the canonical plane as shown: rot90 puts the first in-plane RAS axis along the width."""
    stored = {a: k for k, (a, _) in enumerate(ornt)}
    first, second = sorted({0, 1, 2} - {axis})
    return size[stored[first]], size[stored[second]]


def text_header(path: Path, rel: str, base: Path, limits) -> None:
    """A NRRD / MetaImage text header: ends within max_header_bytes, and a detached data file it names is inside
    the source root (ITK would open whatever path the header gives)."""
    cap = limit(limits, "max_header_bytes")
    meta = suffix(path) in (".mha", ".mhd")
    # the header's last line (MetaImage) or its blank line (NRRD), whole: a block may end inside it
    ends = re.compile(rb"^ElementDataFile\s*=[^\n]*\n" if meta else rb"\r?\n\r?\n", re.MULTILINE)
    head, end = b"", None
    with open(path, "rb") as fh:  # in blocks: a header is small, the voxels after it are not read
        while end is None and len(head) <= cap:
            block = fh.read(1 << 16)
            if not block:  # the end of a file without a final newline ends its last line too
                end = re.search(rb"^ElementDataFile\s*=.*$", head, re.MULTILINE) if meta else None
                break
            head += block
            end = ends.search(head)
    head = head[: cap + 1]
    if end is None:
        if len(head) > cap:
            raise RecordError(f"volume header too large: {rel} has no end of header within max_header_bytes {cap}")
        if meta or not head.startswith(b"NRRD"):
            return  # not a header of this kind: ITK names what it is
        end_at = len(head)
    else:
        end_at = end.end()
    text = head[:end_at].decode("latin-1")
    key = r"^ElementDataFile\s*=\s*(.*?)\s*$" if meta else r"^data ?file:\s*(.*?)\s*$"
    found = re.search(key, text, re.MULTILINE | re.IGNORECASE)
    if found is None or found.group(1) == "LOCAL":
        return
    name = found.group(1)
    if name.upper().startswith("LIST") or "%" in name or " " in name:
        raise RecordError(f"unsupported detached data in {rel}: {name[:80]!r} (a list or pattern of files)")
    target = (path.parent / name).relative_to(base) if (path.parent / name).is_relative_to(base) else None
    if target is None or inside(base, target.as_posix()) is None:
        raise RecordError(f"path escapes the source root: data file {name[:80]!r} of {rel}")


def read_header(path: Path, rel: str, base: Path, limits, spec_max: int) -> sitk.ImageFileReader:
    """The file's header, refused when it is no scalar 3-D/4-D volume or its read would exceed the limits."""
    if suffix(path) in (".nii", ".nii.gz"):
        check_header(path, rel, limits)  # extensions walked under max_header_bytes before ITK reads them
    else:
        text_header(path, rel, base, limits)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise RecordError(f"not a volume file: {rel} ({' '.join(str(exc).split())[-200:]})") from None
    size = tuple(int(s) for s in reader.GetSize())
    if len(size) < 3 or (len(size) == 3 and min(size) < 1):
        raise RecordError(f"not a volume: {rel} is {len(size)}-D {size} (need 3-D or 4-D)")
    if len(size) > 4:
        raise RecordError(f"not a volume: {rel} is {len(size)}-D {size} (need 3-D or 4-D)")
    if reader.GetNumberOfComponents() != 1 or reader.GetPixelID() not in _SCALAR:
        raise RecordError(f"not a scalar volume: {rel} has {reader.GetNumberOfComponents()} component(s) of "
                          f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())}")
    if suffix(path) not in STREAMED:
        nbytes = int(np.prod(size, dtype=np.float64)) * np.dtype(dtype(reader.GetPixelID())).itemsize
        if nbytes > spec_max:
            raise RecordError(f"volume too large to read whole: {rel} is {size} = {nbytes} voxel bytes > "
                              f"volume_max_bytes {spec_max} ({suffix(path)} cannot be read a slice at a time)")
    return reader


def dtype(pixel_id: int):
    return {sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16, sitk.sitkInt16: np.int16,
            sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32, sitk.sitkUInt64: np.uint64,
            sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32}.get(pixel_id, np.float64)
