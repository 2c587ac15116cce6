"""Owns user inputs for inference: expanding files and folders, and reading any image through curation's readers.

A PNG/JPEG/TIFF/BMP/WebP (16-bit included), a DICOM (its middle frame) or a NIfTI volume (its middle axial
slice) becomes the 8-bit RGB curation would have stored for it: the same readers, windowing and `max_side`
downscale, so the model sees at inference what it saw in training. Serving's own, smaller limits
(mmkd.serving.limits, params.yaml `serving`) are checked from the header first.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.config import CurateCfg, ServingCfg, SourceCfg
from mmkd.data.imaging import RecordError, fit_side
from mmkd.data.sources.folder import IMAGE_SUFFIXES
from mmkd.serving.limits import InputError, TooLarge, check_file, check_payload  # noqa: F401 - re-exported

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Skipped:
    input: str
    reason: str


def _is_dicom(head: bytes) -> bool:
    return head[128:132] == b"DICM"  # the Part 10 preamble; curation's reader needs it too


def _is_nifti(head: bytes) -> bool:
    if head[:2] == b"\x1f\x8b":  # gzip (.nii.gz): look at the header inside; a partial stream is enough
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 352)
        except zlib.error:
            return False
    return head[344:347] in (b"n+1", b"ni1") or head[4:7] == b"n+2"


def kind_of(path: Path, head: bytes = b"") -> str:
    """`dicom`, `nifti` or `image`: by suffix first, else by content (DICOM files often have no suffix)."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    if _is_dicom(head):
        return "dicom"
    if _is_nifti(head):
        return "nifti"
    return "image"


def _looks_readable(path: Path) -> bool:
    """Whether a file found in a folder is an input (sidecars such as .txt/.json are not)."""
    name = path.name.lower()
    if path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES or name.endswith(NIFTI_SUFFIXES):
        return True
    if path.name.startswith("."):
        return False
    with open(path, "rb") as fh:  # any other name: a DICOM by its preamble (PACS exports name files by UID)
        return _is_dicom(fh.read(132))


def expand(args: Iterable[str | Path]) -> tuple[list[Path], list[Skipped]]:
    """The files the arguments name: files as given, folders searched recursively (sorted); missing paths and
    folders with nothing readable are skipped with a reason."""
    files: list[Path] = []
    skipped: list[Skipped] = []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _looks_readable(p))
            if not found:
                skipped.append(Skipped(str(arg), "folder holds no image, DICOM or NIfTI file"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            skipped.append(Skipped(str(arg), "no such file or folder"))
    return files, skipped


def _curate_cfg(cfg: CurateCfg | None, limits: ServingCfg) -> CurateCfg:
    """Curation's readers under serving's limits too: their own checks then agree with the header checks."""
    cfg = cfg or CurateCfg()
    # burned-in text is refused from training data (it would be stored); a prediction stores nothing of the image
    update = {"max_pixels": min(cfg.max_pixels, limits.max_pixels), "dicom_burned_in": "keep"}
    for knob in ("max_file_bytes", "max_inflated_bytes"):  # curation's byte limits, where it has them
        if knob in CurateCfg.model_fields:
            update[knob] = min(getattr(cfg, knob), limits.max_image_bytes)
    return cfg.model_copy(update=update)


def read_image(path: str | Path, cfg: CurateCfg | None = None, name: str | None = None,
               limits: ServingCfg | None = None) -> np.ndarray:
    """8-bit RGB (H, W, 3) of one file, as curation reads it; InputError naming the file (or `name`) if it cannot,
    TooLarge (an InputError) if its header is over a serving limit."""
    limits = limits or ServingCfg()
    cfg = _curate_cfg(cfg, limits)
    path = Path(path)
    name = name or str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2048)
        kind = kind_of(path, head)
        check_file(path, kind, limits)
        if kind == "image":
            from mmkd.data.sources.files import decode_bytes

            rgb = decode_bytes(path.read_bytes(), cfg)
        else:
            rgb = _read_volume(path, kind, cfg)
    except InputError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    except RecordError as exc:
        raise InputError(f"{name}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return fit_side(rgb, cfg.max_side)


def _read_volume(path: Path, kind: str, cfg: CurateCfg) -> np.ndarray:
    """A DICOM's or NIfTI's pixels through its curation reader, with the source defaults (middle frame/slice)."""
    from mmkd.data.sources import reader

    mod = reader(kind)
    rec = next(mod.iter_records(SourceCfg(name="input", kind=kind, path=str(path.resolve())), path.parent, cfg), None)
    if rec is None or rec.problem:
        raise RecordError(rec.problem if rec else f"nothing to read in {path.name}")
    return mod.load_pixels(rec, cfg)


def decode_bytes(data: bytes, cfg: CurateCfg | None = None, name: str = "input",
                 limits: ServingCfg | None = None) -> np.ndarray:
    """read_image for bytes (a request's base64 payload): image formats in memory, DICOM/NIfTI via a temp file;
    the header is checked against the serving limits before anything is decoded or written."""
    limits = limits or ServingCfg()
    cfg = _curate_cfg(cfg, limits)
    kind = kind_of(Path(name), data[:2048])
    try:
        check_payload(data, kind, limits)
    except InputError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    if kind == "image":
        from mmkd.data.sources.files import decode_bytes as decode_image

        try:
            return fit_side(decode_image(data, cfg), cfg.max_side)
        except RecordError as exc:
            raise InputError(f"{name}: {exc}") from None
    suffix = ".dcm" if kind == "dicom" else ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory(prefix="mmkd-input-") as tmp:
        path = Path(tmp) / f"{Path(name).name}{suffix}"
        path.write_bytes(data)
        return read_image(path, cfg, name, limits)


def read_all(args: Iterable[str | Path], cfg: CurateCfg | None = None, limits: ServingCfg | None = None
             ) -> tuple[list[tuple[Path, np.ndarray]], list[Skipped]]:
    """Every readable input as (path, RGB), and the skipped ones (unreadable, over a limit) with their reasons."""
    files, skipped = expand(args)
    images = []
    for path in files:
        try:
            images.append((path, read_image(path, cfg, limits=limits)))
        except InputError as exc:
            skipped.append(Skipped(str(path), str(exc).removeprefix(f"{path}: ")))
    return images, skipped
