"""Owns serving's input limits: each payload's size read from its header (PNG/JPEG/TIFF/BMP/WebP, DICOM, NIfTI)
and refused before any pixel is decoded; a deflated DICOM is counted as it inflates, with a cap, never whole.

Curation's readers check sizes too, but against curation's limits (1e8 pixels) and, for a deflated DICOM, only
after pydicom has inflated the whole dataset in memory: a server answering strangers needs smaller limits,
applied first. The limits are a `ServingCfg` (params.yaml `serving`, carried into the registered model).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np

HEADER_MAX = 4 * 2**20  # a NIfTI header with its extensions: more is refused


class InputError(ValueError):
    """An input that cannot be read; the message names it and says why."""


class TooLarge(InputError):
    """An input over a serving limit (HTTP 413 from the served model); the message says "too large" and which."""


def size_text(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def check_bytes(size: int, limits) -> None:
    if size > limits.max_image_bytes:
        raise TooLarge(f"too large: {size_text(size)} of image data > serving.max_image_bytes "
                       f"{size_text(limits.max_image_bytes)}")


def check_pixels(width: int, height: int, limits, what: str = "image") -> None:
    if width * height > limits.max_pixels:
        raise TooLarge(f"too large: {what} {width}x{height} = {width * height} pixels > serving.max_pixels "
                       f"{limits.max_pixels}")


def check_decoded(nbytes: int, limits, what: str) -> None:
    if nbytes > limits.max_decoded_bytes:
        raise TooLarge(f"too large: {what} {size_text(nbytes)} > serving.max_decoded_bytes "
                       f"{size_text(limits.max_decoded_bytes)}")


def check_payload(data: bytes, kind: str, limits) -> None:
    """An input's bytes of `kind` (image, dicom, nifti) within the limits, from their size and header only."""
    check_bytes(len(data), limits)
    check_stream(io.BytesIO(data), kind, limits)


def check_file(path: Path, kind: str, limits) -> None:
    """check_payload for a file, reading its header only."""
    check_bytes(path.stat().st_size, limits)
    with open(path, "rb") as fh:
        check_stream(fh, kind, limits)


def check_stream(fh, kind: str, limits) -> None:
    if kind == "dicom":
        _check_dicom(fh, limits)
    elif kind == "nifti":
        _check_nifti(fh.read(2**16), limits)
    else:
        _check_image(fh, limits)


def _check_image(fh, limits) -> None:
    """PNG/JPEG/TIFF/BMP/WebP: size and mode from PIL's lazy open (the header only); content PIL cannot identify
    is refused as curation's decoder refuses it (same reason), other header damage is left to that decoder."""
    from PIL import Image, ImageMode, UnidentifiedImageError

    try:
        im = Image.open(fh)  # lazy: reads the header, decodes nothing
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice its MAX_IMAGE_PIXELS
        raise TooLarge(f"too large: {exc}") from None
    except UnidentifiedImageError:
        fh.seek(0)
        start = fh.read(8)
        if not start:
            raise InputError("empty file (0 bytes)") from None
        raise InputError(f"not an image: content is no known image format (starts {start!r})") from None
    except (OSError, SyntaxError, ValueError):
        return
    w, h = im.size
    check_pixels(w, h, limits)
    try:
        per_pixel = len(im.getbands()) * np.dtype(ImageMode.getmode(im.mode).typestr).itemsize
    except (KeyError, TypeError):
        per_pixel = 4 * len(im.getbands())  # an unusual mode: assume 32-bit samples
    check_decoded(w * h * per_pixel, limits, f"{w}x{h} {im.mode} pixels")


def _check_dicom(fh, limits) -> None:
    """Rows x Columns per frame, and frames x samples x bits in all, from the header (before Pixel Data); a
    deflated dataset is first counted as it inflates, in bounded pieces (curation's inflated_size), and refused
    past max_image_bytes (what the same DICOM could hold uncompressed): pydicom would inflate it whole."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from mmkd.data.sources.files import inflated_size

    try:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)  # pydicom's read_file_meta_info, on an open stream
        cap = limits.max_image_bytes
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian and inflated_size(fh, cap) > cap:
            raise TooLarge(f"too large: deflated DICOM dataset inflates to more than {size_text(cap)} "
                           f"(serving.max_image_bytes)")
        fh.seek(0)
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - not DICOM or a broken header: curation's reader says which, precisely
        return
    if "Rows" not in ds or "Columns" not in ds:
        return  # no image: curation's reader names it
    rows, cols = int(ds.Rows or 0), int(ds.Columns or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    spp, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 16)
    check_pixels(cols, rows, limits, "DICOM frame")
    check_decoded(frames * rows * cols * spp * max(1, (bits + 7) // 8), limits,
                  f"DICOM pixel data ({frames} frame(s) of {cols}x{rows}x{spp}, {bits}-bit)")


def _check_nifti(head: bytes, limits) -> None:
    """The slice size (largest of the in-plane products) and the volume's bytes, from the header alone."""
    import nibabel as nib

    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 540)
        except zlib.error:
            return  # curation's reader says it is no NIfTI
    cls = nib.Nifti2Header if head[4:7] == b"n+2" else nib.Nifti1Header
    try:
        hdr = cls.from_fileobj(io.BytesIO(head[: cls.template_dtype.itemsize]))  # no extensions read
        shape = [int(s) for s in hdr.get_data_shape()]
        itemsize = hdr.get_data_dtype().itemsize
        offset = int(hdr.get_data_offset())
    except Exception:  # noqa: BLE001 - not NIfTI: curation's reader says so
        return
    if offset > HEADER_MAX:
        raise TooLarge(f"too large: NIfTI header and extensions {size_text(offset)} > {size_text(HEADER_MAX)}")
    if len(shape) < 3:
        return  # not a volume: curation's reader names it
    x, y, z = shape[:3]
    biggest = max((x, y), (x, z), (y, z), key=lambda p: p[0] * p[1])
    check_pixels(*biggest, limits, "NIfTI slice")
    check_decoded(int(np.prod(shape, dtype=np.int64)) * itemsize, limits,
                  f"NIfTI volume {'x'.join(map(str, shape))} of {hdr.get_data_dtype()}")
