"""Owns the DICOM source: one record per chosen frame of each file, decoded and windowed to 8-bit RGB.

Every file is read inside the source root, a deflated dataset only after its inflated size was counted
under max_inflated_bytes, and one unreadable file becomes one quarantined record; which objects are images to
train on (SOP class, burned-in text, preamble-less data sets) is decided by dicom_objects, from the header.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from mmkd.config import CurateCfg
from mmkd.data import imaging
from mmkd.data.imaging import RecordError, check_size
from mmkd.data.sources import RawRecord, inside, source_root
from mmkd.data.sources.dicom_objects import implied_transfer_syntax, needs_force, refusal
from mmkd.data.sources.files import per_file_records, contained, inflated_size, limit, sidecar_caption

MODALITIES = {"CT": "ct", "MR": "mri", "US": "ultrasound", "SM": "pathology", "OP": "fundus", "OPT": "oct",
              "OCT": "oct", "ES": "endoscopy", **{m: "xray" for m in ("CR", "DX", "MG", "RF", "XA", "RG", "PX")}}
CAPTION_TAGS = ("Modality", "BodyPartExamined", "StudyDescription", "SeriesDescription")
_MAX_TAG = 64 * 1024  # bytes of one tag value used in a caption or a record field (larger: left unread)
# keywords never formatted into a caption, whatever the template asks for (identifying data)
_PHI = re.compile(r"Name|ID|Date|Time|Birth|Address|Phone|Accession|Institution|Physician|Operator|Comments")


def iter_records(spec, data_root: Path, limits=None) -> Iterator[RawRecord]:
    root = source_root(spec, data_root)
    if spec.caption_template:
        _format(spec.caption_template, pydicom.Dataset())  # a bad template is a config error: fail early
    yield from per_file_records(spec, root, "**/*.dcm", "DICOM", _file_records, limits)


def read_header(path: Path, name: str, limits):
    """The dataset without pixel data, read under the limits: a deflated dataset is first inflated in bounded
    pieces and refused past max_inflated_bytes (pydicom inflates it whole); large values stay on disk. A data set
    without the Part 10 preamble is read as pydicom's force=True would, a file that is no data set is refused."""
    return _read(path, name, limits)[0]


def _read(path: Path, name: str, limits):
    """(dataset without pixels, whether a Pixel Data element follows: None when not known, as when deflated)."""
    cap = limit(limits, "max_inflated_bytes")
    with open(path, "rb") as fh:
        force = needs_force(fh.read(132), name)
        fh.seek(0)
        try:
            read_preamble(fh, force)
            meta = _read_file_meta_info(fh)
        except Exception:
            meta = None  # dcmread below names what is wrong
        deflated = meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if deflated and inflated_size(fh, cap) > cap:
            raise RecordError(f"deflated DICOM too large: {name} inflates past max_inflated_bytes {cap}")
        fh.seek(0)
        # defer_size leaves huge values on disk; not for a deflated dataset, whose offsets are in the inflated
        # buffer (pydicom would re-read them from the compressed file): it is in memory anyway, under the cap
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=force,
                             defer_size=None if deflated else limit(limits, "max_sidecar_bytes"))
        # pydicom stops reading at a pixel element, rewound to its tag: the next 4 bytes say whether there is one
        tag = fh.read(4)
    if deflated or len(tag) < 4:
        return ds, None if deflated else False
    group, element = struct.unpack(("<" if ds.original_encoding[1] is not False else ">") + "HH", tag)
    return ds, group == 0x7FE0 and element in (0x0008, 0x0009, 0x0010)


def _burned_in(limits) -> str:
    value = getattr(limits, "dicom_burned_in", None)
    return value or CurateCfg.model_fields["dicom_burned_in"].default


def _frame_count(ds, rel: str) -> int:
    value = _tag(ds, "NumberOfFrames") or "1"
    try:
        n = int(float(value))
    except ValueError:
        raise RecordError(f"bad NumberOfFrames {value[:40]!r} in DICOM file {rel} (not a number)") from None
    if n < 1:
        raise RecordError(f"bad NumberOfFrames {n} in DICOM file {rel}")
    return n


def _file_records(spec, path: Path, base: Path, rel: str, limits) -> list[RawRecord]:
    rec = RawRecord(spec.name, spec.kind, rel, rel, raw={"path": rel})
    try:
        if inside(base, rel) is None:  # a symlink pointing outside the root
            raise RecordError(f"path escapes the source root: {rel}")
        ds, pixels = _read(path, rel, limits)
        if problem := refusal(ds, rel, _burned_in(limits), pixels):
            raise RecordError(problem)
        if "Rows" not in ds or "Columns" not in ds:
            raise RecordError(f"no image in DICOM file {rel}: no Rows/Columns (Modality {_tag(ds, 'Modality') or '?'}; "
                              "a non-image object or a truncated header)")
        tags = {t: _tag(ds, t) for t in (*CAPTION_TAGS, "PhotometricInterpretation", "Rows", "Columns")}
        tags["TransferSyntaxUID"] = str(ds.file_meta.get("TransferSyntaxUID", ""))
        rec.raw["tags"] = tags
        n = _frame_count(ds, rel)
    except RecordError as exc:
        rec.problem = str(exc)
    except InvalidDicomError:
        rec.problem = f"not a DICOM file: {rel} (no DICM prefix / file meta header)"
    except Exception as exc:  # truncated or garbled header
        rec.problem = f"unreadable DICOM header: {rel}: {type(exc).__name__}: {exc}"
    if rec.problem:
        return [rec]
    frames, bad = _frames(spec, n)
    if bad:
        rec.problem = f"frame indices {bad} out of range for {rel} ({n} frames)"
        rec.raw.update(frames=n)
        return [rec]
    try:
        caption = _caption(spec, ds, path, base, limits, rel)
    except RecordError as exc:
        rec.problem = str(exc)
        return [rec]
    group = _tag(ds, "PatientID") or _tag(ds, "StudyInstanceUID") or None
    modality = spec.modality or MODALITIES.get(_tag(ds, "Modality"))
    return [RawRecord(spec.name, spec.kind, f"{rel}#frame{i}", rel, caption=caption, modality=modality, group=group,
                      loc={"path": str(path), "frame": i, "rel": rel, "root": str(base)},
                      raw={"path": rel, "frame": i, "frames": n, "tags": tags}) for i in frames]


def _frames(spec, n: int) -> tuple[list[int], list[int]]:
    """(frames to keep, out-of-range requested indices)."""
    if spec.frames == "first":
        return [0], []
    if spec.frames == "middle":
        return [n // 2], []
    if spec.frames == "all":  # evenly spaced, at most max_frames
        return sorted({int(i) for i in np.linspace(0, n - 1, min(n, spec.max_frames)).round()}), []
    return list(spec.frames), [i for i in spec.frames if not 0 <= i < n]


def _caption(spec, ds, path: Path, base: Path, limits, rel: str) -> str:
    plain = path.suffix.lower() in (".dcm", ".dicom", ".ima")  # else "1.2.840....": keep the full name
    sidecar = path.with_suffix(".txt") if plain else path.with_name(path.name + ".txt")
    text = sidecar_caption(base, sidecar, limits, rel)
    if text is not None:
        return text
    if spec.caption_template:
        return _tidy(_format(spec.caption_template, ds))
    mod, body, *desc = (_tag(ds, t) for t in CAPTION_TAGS)
    if not (mod or body or any(desc)):
        return ""
    text = f"{mod} image" + (f" of the {body.lower()}" if body else "")
    desc_text = " ".join(d for d in desc if d)
    return _tidy(text + (f", {desc_text}" if desc_text else ""))


class _Tags(dict):
    def __init__(self, ds):
        super().__init__()
        self.ds = ds

    def __missing__(self, keyword: str) -> str:
        return "" if _PHI.search(keyword) else _tag(self.ds, keyword)


def _format(template: str, ds) -> str:
    try:
        return template.format_map(_Tags(ds))
    except (ValueError, IndexError, AttributeError) as exc:
        raise ValueError(f"bad DICOM caption_template {template!r}: {exc}") from None


def _tag(ds, keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds or getattr(ds.get_item(tag), "length", 0) > _MAX_TAG:
        return ""  # a value left on disk by defer_size (huge) is never read for a caption
    value = ds.get(keyword)
    if value is None or isinstance(value, Sequence):
        return ""
    return " ".join(map(str, value)) if isinstance(value, MultiValue) else str(value)


def _tidy(text: str) -> str:
    """Collapse whitespace and the separators left dangling by empty tags."""
    text = re.sub(r"\s+([,;:.])", r"\1", " ".join(text.split()))
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:-")


def load_pixels(rec: RawRecord, cfg) -> np.ndarray:
    path, frame = Path(rec.loc["path"]), int(rec.loc.get("frame", 0))
    if "root" in rec.loc:
        path = contained(rec.loc["root"], rec.loc.get("rel", path), rec.origin)
    if not path.is_file():
        raise RecordError(f"DICOM file not found: {rec.origin}")
    try:
        ds = read_header(path, rec.origin, cfg)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(f"unreadable DICOM header: {rec.origin}: {exc}") from None
    check_size(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), cfg)
    arr = _decode(path, frame, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = pydicom.pixels.apply_color_lut(arr, ds)
        return arr if arr.dtype == np.uint8 else imaging.window(arr, 0, 255 if arr.max() <= 255 else 65535)
    if arr.ndim == 3:  # RGB (YBR already converted by pydicom)
        return arr if arr.dtype == np.uint8 else imaging.percentile_window(arr, cfg.highbit_percentiles)
    return imaging.gray_to_rgb(_gray8(arr, ds, frame, cfg, invert=photometric == "MONOCHROME1"))


def _decode(path: Path, frame: int, ds) -> np.ndarray:
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        if ts == DeflatedExplicitVRLittleEndian:  # pixel_array(path) cannot parse a deflated stream: the dataset,
            # already checked under max_inflated_bytes by read_header, is inflated whole
            return pixel_array(pydicom.dcmread(path), index=frame)
        if ts is None:  # no file meta (an old export): the encoding pydicom found while reading the header
            ts = implied_transfer_syntax(ds)
            return pixel_array(path, index=frame, transfer_syntax_uid=ts)
        return pixel_array(path, index=frame)
    except RuntimeError as exc:
        msg, options = str(exc), _plugin_options(str(exc))
        name = f"{ts.name} ({ts})" if ts else "unknown"
        if options:
            raise RecordError(f"no decoder for transfer syntax {name} of {path.name}: install one of "
                              f"{', '.join(options)} (the dicom-codecs extra)") from None
        raise RecordError(f"cannot decode transfer syntax {name} of {path.name}: {' '.join(msg.split())}") from None
    except Exception as exc:  # truncated pixel data, missing Pixel Data, bad frame
        raise RecordError(f"cannot decode pixel data of {path.name} frame {frame} (truncated or corrupt?): "
                          f"{type(exc).__name__}: {exc}") from None


def _plugin_options(msg: str) -> list[str]:
    """The packages each decoder plugin needs, from pydicom's "<plugin> - requires pkg>=x and pkg2>=y" lines."""
    options = []
    for reqs in re.findall(r"^\s*\S+ - requires (.+)$", msg, re.MULTILINE):
        names = (re.match(r"[A-Za-z0-9_.-]*", r.strip()).group() for r in re.split(r",|\band\b", reqs))
        pkgs = [n for n in names if n and n != "numpy"]  # numpy is always installed here
        if pkgs:
            options.append(" + ".join(pkgs))
    return options


def _frame_item(ds, frame: int, seq: str):
    """`seq`'s item for this frame in enhanced multi-frame functional groups (per-frame first, then shared)."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and i < len(items) and seq in items[i]:
            return items[i][seq][0]
    return None


def _gray8(arr: np.ndarray, ds, frame: int, cfg, invert: bool) -> np.ndarray:
    """Modality LUT (rescale), then the first VOI LUT / window, else a percentile window; MONOCHROME1 inverted."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
        arr = apply_modality_lut(arr, ds)
    elif (pvt := _frame_item(ds, frame, "PixelValueTransformationSequence")) is not None and "RescaleSlope" in pvt:
        arr = arr * float(pvt.RescaleSlope) + float(pvt.get("RescaleIntercept", 0))
    arr = arr.astype(np.float64)
    if "VOILUTSequence" in ds:
        lut = ds.VOILUTSequence[0].LUTData
        lut = np.frombuffer(lut, np.uint16) if isinstance(lut, bytes) else np.asarray(lut)
        out = apply_voi_lut(np.rint(arr).astype(np.int64), ds, index=0)  # a LUT is indexed by integers
        return imaging.window(out, float(lut.min()), float(lut.max()), invert)
    voi = ds if "WindowWidth" in ds else _frame_item(ds, frame, "FrameVOILUTSequence")
    if voi is not None and "WindowWidth" in voi and "WindowCenter" in voi:
        c, w = (float(v[0] if isinstance(v, MultiValue) else v) for v in (voi.WindowCenter, voi.WindowWidth))
        if w > 0:
            return _window(arr, c, w, str(voi.get("VOILUTFunction", "LINEAR")), invert)
    if int(ds.get("BitsStored") or 16) <= 8 and arr.min() >= 0 and "RescaleSlope" not in ds:
        return imaging.window(arr, 0, 255, invert)  # plain 8-bit data: keep its contrast as stored
    return imaging.percentile_window(arr, cfg.highbit_percentiles, invert)


def _window(arr: np.ndarray, c: float, w: float, function: str, invert: bool) -> np.ndarray:
    """The DICOM window functions (PS3.3 C.11.2.1.2), onto 0..255."""
    if function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (arr - c) / w))
        return np.rint(255.0 - out if invert else out).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return imaging.window(arr, c - w / 2, c + w / 2, invert)
    return imaging.window(arr, c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2, invert)
