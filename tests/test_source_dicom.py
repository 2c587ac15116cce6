"""The DICOM source's completeness: preamble-less files, non-image objects, burned-in text, the codec extra, and
every sample file pydicom ships (`python -m tests.test_source_dicom` prints the outcome table of docs/formats/dicom.md).
"""

import importlib.util
import io
import re
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydantic import ValidationError
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.imaging import RecordError
from mmkd.data.sources import dicom, iter_source
from mmkd.data.sources.dicom_objects import IMAGE_CLASSES_NAMED_OTHERWISE, is_image_class

DCM = Path(pydicom.__file__).parent / "data/test_files"
CFG = CurateCfg()
ANY_SIZE = CurateCfg(min_side=1)  # the codec tests: pydicom's smallest samples are 3x3 (curation refuses < 16)


def folder(tmp_path: Path, *names: str, sub: str = "src") -> Path:
    out = tmp_path / sub
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DCM / name, out / Path(name).name)
    return out


def records(root: Path, limits=None, **kw) -> list:
    spec = SourceCfg(name="s", kind="dicom", path=str(root), **kw)
    return list(iter_source(spec, root, limits))


def by_origin(root: Path, limits=None, **kw) -> dict:
    return {r.origin: r for r in records(root, limits, **kw)}


def gray(name: str) -> np.ndarray:
    return pydicom.dcmread(DCM / name).pixel_array


def without_preamble(name: str, keep_meta: bool) -> bytes:
    """A Part 10 sample rewritten as an old export: no 128-byte preamble and DICM, and (keep_meta False) no file
    meta group either, so the transfer syntax is only what the encoding of the first element says."""
    data = (DCM / name).read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length first
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    return data[132:] if keep_meta else data[meta_end:]


def with_tags(tmp_path: Path, name: str, out: str, **tags) -> Path:
    ds = pydicom.dcmread(DCM / name)
    for key, value in tags.items():
        setattr(ds, key, value)
    if "SOPClassUID" in tags:
        ds.file_meta.MediaStorageSOPClassUID = tags["SOPClassUID"]
    path = tmp_path / out
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


# ------------------------------------------------------------------ preamble-less files

def test_preamble_less_files_decode_like_the_part10_original(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    (root / "ct_meta.dcm").write_bytes(without_preamble("CT_small.dcm", keep_meta=True))
    (root / "ct_raw.dcm").write_bytes(without_preamble("CT_small.dcm", keep_meta=False))       # explicit VR LE
    (root / "mr_implicit.dcm").write_bytes(without_preamble("MR_small_implicit.dcm", keep_meta=False))
    (root / "mr_bigendian.dcm").write_bytes(without_preamble("MR_small_bigendian.dcm", keep_meta=False))
    shutil.copy(DCM / "CT_small.dcm", root / "ct_part10.dcm")
    recs = by_origin(root)
    assert all(r.problem is None for r in recs.values()), {k: r.problem for k, r in recs.items()}
    px = {k: dicom.load_pixels(r, CFG) for k, r in recs.items()}
    assert np.array_equal(px["ct_meta.dcm"], px["ct_part10.dcm"])
    assert np.array_equal(px["ct_raw.dcm"], px["ct_part10.dcm"])
    mr = dicom.load_pixels(records(folder(tmp_path, "MR_small.dcm", sub="mr"))[0], CFG)
    assert np.array_equal(px["mr_implicit.dcm"], mr) and np.array_equal(px["mr_bigendian.dcm"], mr)
    # the same fields as from the Part 10 file: caption, group, modality
    assert [(r.caption, r.group, r.modality) for r in (recs["ct_raw.dcm"], recs["ct_part10.dcm"])] == \
        [("CT image, e+1", "1CT1", "ct")] * 2


def test_real_preamble_less_samples_are_read(tmp_path):
    """pydicom's own no-meta exports (explicit VR, both byte orders) are read, and then refused for what they are."""
    root = folder(tmp_path, "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm")
    for rec in records(root):
        assert rec.problem == (f"no image to train on in DICOM file {rec.origin}: its SOP Class is RT Ion Plan "
                               "Storage (1.2.840.10008.5.1.4.1.1.481.8), not an image")


def test_files_that_are_not_dicom_are_refused_by_name(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(buf, "PNG")
    (root / "png.dcm").write_bytes(buf.getvalue())
    (root / "random.dcm").write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "empty.dcm").write_bytes(b"")
    (root / "zeros.dcm").write_bytes(bytes(1000))
    (root / "text.dcm").write_text("(0008,0016) UI CT Image Storage\n")  # a dump, not a data set
    shutil.copy(DCM / "no_meta.dcm", root / "no_meta.dcm")  # pydicom's: one stray byte before (0008,0005)
    recs = by_origin(root)
    assert recs["empty.dcm"].problem == "not a DICOM file: empty.dcm (empty file)"
    for name in ("png.dcm", "random.dcm", "zeros.dcm", "text.dcm", "no_meta.dcm"):
        assert recs[name].problem.startswith(f"not a DICOM file: {name} (no DICM prefix, and it does not start "
                                             "with a DICOM data element: first bytes "), recs[name].problem
    assert "89504e470d0a1a0a" in recs["png.dcm"].problem  # the PNG signature, shown as found


# ------------------------------------------------------------------ objects that are not images to train on

REAL_NON_IMAGES = {  # pydicom's real samples: file -> the class the refusal names
    "liver_1frame.dcm": "Segmentation Storage",  # a real DICOM-SEG (dcmqi) of a liver CT: carries pixels
    "liver_expb_1frame.dcm": "Segmentation Storage",
    "rtstruct.dcm": "RT Structure Set Storage",
    "rtplan.dcm": "RT Plan Storage",
    "reportsi.dcm": "Basic Text SR Storage",
    "test-SR.dcm": "Comprehensive SR Storage",
    "waveform_ecg.dcm": "12-lead ECG Waveform Storage",
    "dicomdirtests/DICOMDIR-empty.dcm": "Media Storage Directory Storage",  # SOP class only in the file meta
}


def test_real_non_image_objects_are_refused_with_their_class_named(tmp_path):
    root = folder(tmp_path, *REAL_NON_IMAGES)
    recs = by_origin(root)
    for name, cls in REAL_NON_IMAGES.items():
        rec = recs[Path(name).name]
        uid = next(k for k, v in UID_dictionary.items() if v[0] == cls)
        assert rec.problem == (f"no image to train on in DICOM file {rec.origin}: its SOP Class is {cls} ({uid}), "
                               "not an image"), rec.problem
    seg = pydicom.dcmread(DCM / "liver_1frame.dcm")
    assert "PixelData" in seg and seg.Rows > 16  # refused for its class, although it would decode


@pytest.mark.parametrize("uid, name", [
    ("1.2.840.10008.5.1.4.1.1.11.1", "Grayscale Softcopy Presentation State Storage"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "Key Object Selection Document Storage"),
    ("1.2.840.10008.5.1.4.1.1.104.1", "Encapsulated PDF Storage"),
    ("1.2.840.10008.5.1.4.1.1.104.2", "Encapsulated CDA Storage"),
    ("1.2.840.10008.5.1.4.1.1.66", "Raw Data Storage"),
    ("1.2.840.10008.5.1.4.1.1.66.1", "Spatial Registration Storage"),
    ("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR Storage"),
])
def test_the_class_decides_even_when_pixels_are_there(tmp_path, uid, name):
    """CT_small's pixels relabelled as a non-image object: refused by its class, before any decoding."""
    with_tags(tmp_path, "CT_small.dcm", "x/obj.dcm", SOPClassUID=uid)
    [rec] = records(tmp_path / "x")
    assert rec.problem == f"no image to train on in DICOM file obj.dcm: its SOP Class is {name} ({uid}), not an image"


def test_unknown_or_missing_class_falls_back_to_having_pixel_data(tmp_path):
    root = tmp_path / "fallback"
    with_tags(tmp_path, "CT_small.dcm", "fallback/private.dcm", SOPClassUID="1.2.826.0.1.3680043.9.9999.1")
    ds = pydicom.dcmread(DCM / "CT_small.dcm")
    del ds.SOPClassUID
    ds.file_meta.MediaStorageSOPClassUID = ""
    ds.save_as(root / "no_class.dcm")
    shutil.copy(DCM / "empty_charset_LEI.dcm", root / "no_class_no_pixels.dcm")  # pydicom's: no class, no pixels
    shutil.copy(DCM / "priv_SQ.dcm", root / "ct_without_pixels.dcm")  # MR class in the meta, no Pixel Data
    recs = by_origin(root)
    ref = dicom.load_pixels(records(folder(tmp_path, "CT_small.dcm", sub="ct"))[0], CFG)
    for name in ("private.dcm", "no_class.dcm"):
        assert recs[name].problem is None and np.array_equal(dicom.load_pixels(recs[name], CFG), ref)
    assert recs["no_class_no_pixels.dcm"].problem == \
        "no image in DICOM file no_class_no_pixels.dcm: no Pixel Data (no SOP Class UID, Modality ?)"
    assert recs["ct_without_pixels.dcm"].problem == \
        "no image in DICOM file ct_without_pixels.dcm: no Pixel Data (SOP Class MR Image Storage, Modality ?)"


def test_the_allow_list_over_pydicoms_whole_uid_dictionary():
    storage = {UID(k): v[0] for k, v in UID_dictionary.items() if v[1] == "SOP Class" and "Storage" in v[0]}
    images = {u for u in storage if is_image_class(u)}
    for uid, name in storage.items():
        if re.search(r"SR Storage|Segmentation|Presentation State|Waveform|Encapsulated|Structure Set|RT Plan|"
                     r"Registration|Raw Data|Key Object|Directory|Hardcopy", name):
            assert uid not in images, name
        if re.search(r"^(CT|MR|Enhanced CT|Enhanced MR|Computed Radiography|Digital X-Ray|Ultrasound|"
                     r"VL Whole Slide Microscopy|Secondary Capture|Positron Emission) .*Image Storage", name):
            assert uid in images, name
    assert {str(u) for u in IMAGE_CLASSES_NAMED_OTHERWISE} <= {str(u) for u in images}
    assert UID("1.2.840.10008.5.1.4.1.1.481.2").name == "RT Dose Storage" and is_image_class(
        UID("1.2.840.10008.5.1.4.1.1.481.2"))
    assert is_image_class(UID("1.2.826.0.1.3680043.9.9999.1")) is None  # a private class: the pixels decide
    assert is_image_class(UID("1.2.840.10008.1.2.1")) is None            # a transfer syntax, not a SOP class
    assert 60 <= len(images) < len(storage) / 2  # most storage classes are not images


# ------------------------------------------------------------------ burned-in annotation

def test_burned_in_annotation_is_refused_by_default_and_kept_on_request(tmp_path):
    root = tmp_path / "burn"
    with_tags(tmp_path, "CT_small.dcm", "burn/yes.dcm", BurnedInAnnotation="YES")
    with_tags(tmp_path, "CT_small.dcm", "burn/no.dcm", BurnedInAnnotation="NO")
    recs = by_origin(root)
    assert recs["yes.dcm"].problem == (
        "burned-in annotation in DICOM file yes.dcm: BurnedInAnnotation is YES (text in the pixels can identify the "
        "patient; curate.dicom_burned_in: keep accepts it)")
    assert recs["no.dcm"].problem is None
    assert by_origin(root, CurateCfg(dicom_burned_in="refuse"))["yes.dcm"].problem == recs["yes.dcm"].problem
    kept = by_origin(root, CurateCfg(dicom_burned_in="keep"))
    assert kept["yes.dcm"].problem is None
    assert np.array_equal(dicom.load_pixels(kept["yes.dcm"], CFG), dicom.load_pixels(recs["no.dcm"], CFG))


def test_a_prediction_reads_a_burned_in_file(tmp_path):
    """Serving stores nothing of the image: burned-in text is no reason to refuse a prediction."""
    from mmkd.serving.inputs import read_image

    path = with_tags(tmp_path, "CT_small.dcm", "burn/yes.dcm", BurnedInAnnotation="YES")
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (128, 128, 3)


def test_burned_in_param_is_validated():
    with pytest.raises(ValidationError, match="dicom_burned_in"):
        CurateCfg(dicom_burned_in="maybe")
    assert CurateCfg().dicom_burned_in == "refuse"


# ------------------------------------------------------------------ the codec extra

def test_codec_extra_is_installed():
    missing = [m for m in ("pylibjpeg", "libjpeg", "openjpeg") if importlib.util.find_spec(m) is None]
    assert not missing, f"the dicom-codecs extra is missing {missing}: run `make install` (.[dev,dicom-codecs])"


@pytest.mark.parametrize("name, reference", [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS Lossless (1.2.840.10008.1.2.4.80)
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),       # JPEG 2000 Lossless Only (1.2.840.10008.1.2.4.90)
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),          # JPEG Lossless, Process 14 SV1 (1.2.840.10008.1.2.4.70)
])
def test_lossless_codecs_give_the_uncompressed_pixels(tmp_path, name, reference):
    root = folder(tmp_path, name, reference)
    recs = by_origin(root)
    assert recs[name].raw["tags"]["TransferSyntaxUID"] != recs[reference].raw["tags"]["TransferSyntaxUID"]
    a, b = (dicom.load_pixels(recs[n], CFG) for n in (name, reference))
    assert a.dtype == np.uint8 and a.shape[2] == 3 and np.array_equal(a, b)


@pytest.mark.parametrize("name, ts, shape", [
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81", (45, 10)),  # JPEG-LS near-lossless, 8-bit
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", (50, 10)),  # ... 16-bit
    ("SC_rgb_jls_lossy_line.dcm", "1.2.840.10008.1.2.4.81", (100, 100)),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", (1024, 256)),            # JPEG 2000 (lossy allowed), 16-bit
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91", (512, 512)),
    ("GDCMJ2K_TextGBR.dcm", "1.2.840.10008.1.2.4.90", (400, 400)),      # YBR_RCT colour
    ("examples_jpeg2k.dcm", "1.2.840.10008.1.2.4.90", (480, 640)),
])
def test_lossy_and_colour_codec_samples_decode_to_8bit_rgb(tmp_path, name, ts, shape):
    [rec] = records(folder(tmp_path, name))
    assert rec.raw["tags"]["TransferSyntaxUID"] == ts
    a = dicom.load_pixels(rec, ANY_SIZE)
    assert a.dtype == np.uint8 and a.shape == (*shape, 3) and len(np.unique(a)) > 2
    ref = pydicom.dcmread(DCM / name).pixel_array
    if ref.ndim == 3:  # 8-bit colour is kept as decoded (YBR converted)
        assert np.array_equal(a, ref)
    else:  # grey: windowing is monotone, so the output never decreases where the stored value increases
        out = a[..., 0].ravel()[np.argsort(ref.ravel(), kind="stable")].astype(int)
        assert (np.diff(out) >= 0).all()


@pytest.mark.parametrize("name", ["SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"])
def test_near_lossless_jpeg_ls_stays_within_its_error_bound(tmp_path, name):
    """The near-lossless files encode SC_rgb_rle.dcm's image: each sample within NEAR = 2 (their scan headers)."""
    recs = by_origin(folder(tmp_path, name, "SC_rgb_rle.dcm"))
    a, b = (dicom.load_pixels(recs[n], CFG).astype(int) for n in (name, "SC_rgb_rle.dcm"))
    assert 0 < np.abs(a - b).max() <= 2


# ------------------------------------------------------------------ all of pydicom's sample files

def outcome(rec, cfg=CFG) -> tuple[str, str]:
    """(category, reason) of one listed record: decoded, or the reason it was refused."""
    problem = rec.problem
    if problem is None:
        try:
            rgb = dicom.load_pixels(rec, cfg)
        except RecordError as exc:
            problem = str(exc)
        else:
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, rec.key
            return "decoded to 8-bit RGB", ""
    for pattern, category in OUTCOMES:
        if m := re.search(pattern, problem):
            return category.format(*m.groups()), problem
    return "other", problem


OUTCOMES = [  # refusal reason -> table row ({} is the class or limit named)
    (r"^no image to train on in DICOM file .*: its SOP Class is (.+) \(", "refused, not an image: {}"),
    (r"^no image in DICOM file .*: no (Pixel Data|Rows/Columns)", "refused, holds no image: no {}"),
    (r"^not a DICOM file", "quarantined: not a DICOM data set"),
    (r"^image too small: .* < (min_side \d+)", "quarantined: smaller than {}"),
    (r"^(?:cannot decode|no decoder for) transfer syntax (.+?) \(", "quarantined: undecodable {} data"),
    (r"^cannot decode pixel data .*\(truncated or corrupt\?\)", "quarantined: truncated or corrupt pixel data"),
    (r"^bad (NumberOfFrames)", "quarantined: bad {}"),
]


def sample_outcomes(pattern: str, cfg=CFG) -> dict[str, tuple[str, str]]:
    """Each listed file of pydicom's test_files (recursively) -> its outcome (the worst over its frames)."""
    out: dict[str, tuple[str, str]] = {}
    for rec in iter_source(SourceCfg(name="s", kind="dicom", path=str(DCM), pattern=pattern), DCM, cfg):
        got = outcome(rec, cfg)
        if rec.origin not in out or out[rec.origin][0] == "decoded to 8-bit RGB":
            out[rec.origin] = got
    return out


def test_every_dcm_sample_file_is_decoded_or_refused_with_a_reason():
    files = sorted(p.relative_to(DCM).as_posix() for p in DCM.glob("**/*.dcm") if p.is_file())
    out = sample_outcomes("**/*.dcm")
    assert sorted(out) == files and len(files) >= 78  # every file listed, none lost to a listing failure
    counts = Counter(cat.split(":")[0] for cat, _ in out.values())
    assert "other" not in counts, [(k, v) for k, v in out.items() if v[0] == "other"]
    # 79 files with pydicom 3.0.2: 44 decoded, 12 refused by class, 6 hold no image (data set fragments), 17
    # quarantined (11 of them only for curation's min_side 16)
    good = counts["decoded to 8-bit RGB"] + counts["refused, not an image"] + counts["refused, holds no image"]
    assert good >= 58, counts
    for name, (cat, reason) in out.items():
        # the reason names the file; a size refusal (imaging.check_size) is named by the record's key beside it
        assert cat == "decoded to 8-bit RGB" or Path(name).name in reason or "min_side" in cat, (name, reason)
    for name in REAL_NON_IMAGES:
        assert out[name][0] == f"refused, not an image: {REAL_NON_IMAGES[name]}"
    # the size policy aside (min_side 1), every image sample decodes but pydicom's deliberately broken ones
    relaxed = sample_outcomes("**/*.dcm", ANY_SIZE)
    counts = Counter(cat.split(":")[0] for cat, _ in relaxed.values())
    assert counts["decoded to 8-bit RGB"] + counts["refused, not an image"] >= 58, counts  # 55 + 12 of 79
    failed = sorted(k for k, (cat, _) in relaxed.items() if cat.startswith("quarantined"))
    assert failed == ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "MR_truncated.dcm",
                      "SC_rgb_jpeg.dcm", "badVR.dcm", "no_meta.dcm"], failed


def test_extensionless_samples_are_listed_and_read_too():
    """With pattern **/* the source lists every file: DICOMDIRs are refused by class, PACS-style extensionless
    images (dicomdirtests/77654033/CR1/6154, ...) decode, text and JSON files are refused as not DICOM."""
    out = sample_outcomes("**/*")
    files = sorted(p.relative_to(DCM).as_posix() for p in DCM.glob("**/*") if p.is_file())
    assert sorted(out) == files
    extensionless_images = [k for k in files if re.search(r"/(CR|CT|MR)\w*/\d+$", k)]
    assert len(extensionless_images) >= 20
    assert all(out[k][0] == "decoded to 8-bit RGB" for k in extensionless_images)
    assert out["dicomdirtests/DICOMDIR"][0] == "refused, not an image: Media Storage Directory Storage"
    for name in ("README.txt", "test1.json", "rtplan.dump", "zipMR.gz", "crayons.icc"):
        assert out[name][0] == "quarantined: not a DICOM data set", out[name]


def table(pattern: str = "**/*.dcm") -> str:
    """The docs' outcome table: one row per outcome, with its count and files."""
    rows: dict[str, list[str]] = {}
    for name, (cat, _) in sorted(sample_outcomes(pattern).items()):
        rows.setdefault(cat, []).append(name)
    lines = [f"| outcome | files ({sum(map(len, rows.values()))}) | which |", "|---|---:|---|"]
    for cat, names in sorted(rows.items(), key=lambda kv: (not kv[0].startswith("decoded"), -len(kv[1]), kv[0])):
        shown = ", ".join(f"`{n}`" for n in names) if len(names) <= 12 else f"{len(names)} files"
        lines.append(f"| {cat} | {len(names)} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m tests.test_source_dicom: the table for docs/formats/dicom.md
    import warnings

    warnings.simplefilter("ignore")
    print(f"pydicom {pydicom.__version__}\n\n{table()}\n\n{table('**/*')}")
