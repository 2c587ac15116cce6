"""Medical source readers (DICOM, NIfTI) on the real sample files shipped with pydicom and nibabel."""

import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.imaging import RecordError, percentile_window, window
from mmkd.data.sources import dicom, iter_source, nifti

DCM = Path(pydicom.__file__).parent / "data/test_files"
NII = Path(nib.__file__).parent / "tests/data"
CFG = CurateCfg()


def folder(tmp_path: Path, src: Path, *names: str, sub: str = "src") -> Path:
    out = tmp_path / sub
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, out / name)
    return out


def records(kind: str, root: Path, **kw) -> list:
    return list(iter_source(SourceCfg(name="s", kind=kind, path=str(root), **kw), root))


def pixels(kind: str, root: Path, cfg=CFG, **kw) -> list[np.ndarray]:
    mod = dicom if kind == "dicom" else nifti
    return [mod.load_pixels(r, cfg) for r in records(kind, root, **kw)]


def assert_rgb8(a: np.ndarray, shape: tuple[int, int]) -> None:
    assert a.dtype == np.uint8 and a.shape == (*shape, 3)
    assert (a == 255).mean() < 0.95 and (a == 0).mean() < 0.95 and (a > 0).mean() > 0.05  # not saturated
    assert len(np.unique(a)) > 20


# ---------------------------------------------------------------- DICOM

def test_ct_record_fields_and_pixels(tmp_path):
    root = folder(tmp_path, DCM, "CT_small.dcm")
    [rec] = records("dicom", root)
    assert (rec.key, rec.origin, rec.modality, rec.group, rec.problem) == \
        ("CT_small.dcm#frame0", "CT_small.dcm", "ct", "1CT1", None)
    assert rec.loc == {"path": str(root / "CT_small.dcm"), "frame": 0, "rel": "CT_small.dcm", "root": str(root)}
    assert rec.caption == "CT image, e+1"  # default template, empty body part tidied away
    assert rec.raw["tags"]["Modality"] == "CT" and "PatientID" not in rec.raw["tags"]
    [a] = pixels("dicom", root)
    assert_rgb8(a, (128, 128))
    assert np.array_equal(a[..., 0], a[..., 2])


def test_ct_rescale_is_applied_before_the_window(tmp_path):
    ds = pydicom.dcmread(DCM / "CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400  # in HU: only right after RescaleIntercept -1024
    root = tmp_path / "w"
    root.mkdir()
    ds.save_as(root / "ct.dcm")
    [a] = pixels("dicom", root)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(a[..., 0], window(hu, 40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2))


def test_mr_uses_its_window_and_rle_matches_uncompressed(tmp_path):
    root = folder(tmp_path, DCM, "MR_small.dcm", "MR_small_RLE.dcm")
    plain, rle = pixels("dicom", root)
    raw = pydicom.dcmread(DCM / "MR_small.dcm").pixel_array  # WindowCenter 600, WindowWidth 1600
    assert_rgb8(plain, (64, 64))
    assert np.array_equal(plain[..., 0], window(raw, 600 - 0.5 - 1599 / 2, 600 - 0.5 + 1599 / 2))
    assert np.array_equal(plain, rle)


def test_voi_lut_sequence_is_applied(tmp_path):
    ds = pydicom.dcmread(DCM / "MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    item = pydicom.Dataset()
    item.LUTDescriptor = [1024, 0, 16]
    item.add_new("LUTData", "US", list(range(0, 1024 * 64, 64)))  # linear over 0..1023, saturating above
    ds.VOILUTSequence = pydicom.Sequence([item])
    root = tmp_path / "voi"
    root.mkdir()
    ds.save_as(root / "voi.dcm")
    [a] = pixels("dicom", root)
    assert np.array_equal(a[..., 0], window(ds.pixel_array, 0, 1023))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(DCM / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    root = folder(tmp_path, DCM, "MR_small.dcm")
    ds.save_as(root / "mono1.dcm")
    m2, m1 = pixels("dicom", root)  # sorted: MR_small.dcm, mono1.dcm
    assert np.abs(m1.astype(int) - (255 - m2.astype(int))).max() <= 1


def test_multiframe_all_first_middle_and_bad_indices(tmp_path):
    root = folder(tmp_path, DCM, "SC_rgb_rle_2frame.dcm")
    recs = records("dicom", root, frames="all")
    assert [r.key for r in recs] == ["SC_rgb_rle_2frame.dcm#frame0", "SC_rgb_rle_2frame.dcm#frame1"]
    a, b = (dicom.load_pixels(r, CFG) for r in recs)
    assert a.shape == b.shape == (100, 100, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)
    dose = folder(tmp_path, DCM, "rtdose.dcm", sub="dose")  # 15 frames
    assert [r.loc["frame"] for r in records("dicom", dose, frames="all", max_frames=4)] == [0, 5, 9, 14]
    assert [r.loc["frame"] for r in records("dicom", dose, frames="first")] == [0]
    assert [r.loc["frame"] for r in records("dicom", dose)] == [7]
    [bad] = records("dicom", dose, frames=[0, 20])
    assert "out of range" in bad.problem and "rtdose.dcm" in bad.problem


def test_jpeg_baseline_decodes_to_rgb(tmp_path):
    root = folder(tmp_path, DCM, "SC_rgb_jpeg_dcmtk.dcm")  # YBR_FULL JPEG, via pydicom's Pillow plugin
    [a] = pixels("dicom", root)
    assert a.shape == (100, 100, 3) and a.dtype == np.uint8
    assert np.abs(a[0, 0].astype(int) - [255, 0, 0]).max() <= 3  # red stripe at the top, not YBR values


def test_jpeg_ls_decodes_or_names_the_missing_plugin(tmp_path):
    root = folder(tmp_path, DCM, "MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm")
    plain_rec, jls_rec = sorted(records("dicom", root), key=lambda r: "jpeg" in r.key)
    if importlib.util.find_spec("jpeg_ls") or importlib.util.find_spec("libjpeg"):
        assert np.array_equal(dicom.load_pixels(jls_rec, CFG), dicom.load_pixels(plain_rec, CFG))
        return
    with pytest.raises(RecordError) as err:
        dicom.load_pixels(jls_rec, CFG)
    msg = str(err.value)
    assert "JPEG-LS" in msg and "1.2.840.10008.1.2.4.80" in msg
    assert "pyjpegls" in msg or "pylibjpeg-libjpeg" in msg


def test_plugin_options_parse_pydicoms_message():
    msg = ("Unable to decompress 'JPEG-LS Lossless Image Compression' pixel data because all plugins are missing "
           "dependencies:\n\tgdcm - requires gdcm>=3.0.10\n\tpylibjpeg - requires pylibjpeg>=2.0 and "
           "pylibjpeg-libjpeg>=2.1\n\tpyjpegls - requires numpy and pyjpegls>=1.2")
    assert dicom._plugin_options(msg) == ["gdcm", "pylibjpeg + pylibjpeg-libjpeg", "pyjpegls"]


def test_captions_from_sidecar_and_template_without_identifiers(tmp_path):
    root = folder(tmp_path, DCM, "CT_small.dcm", "MR_small.dcm")
    (root / "MR_small.txt").write_text("Axial T1 MRI of the head", encoding="utf-8")
    ct, mr = records("dicom", root, caption_template="{Modality}  {BodyPartExamined} {StudyDescription}")
    assert (ct.caption, mr.caption) == ("CT e+1", "Axial T1 MRI of the head")
    [ct, _] = records("dicom", root, caption_template="{PatientName} {PatientID} {StudyDate} {Modality} scan")
    assert ct.caption == "CT scan"
    assert records("dicom", root, modality="mri")[0].modality == "mri"  # the source's modality wins
    with pytest.raises(ValueError, match="caption_template"):
        records("dicom", root, caption_template="{Modality")


def test_unreadable_files_become_problems_or_record_errors(tmp_path):
    root = folder(tmp_path, DCM, "MR_truncated.dcm", "rtplan_truncated.dcm")
    (root / "notes.dcm").write_text("not a dicom file at all")
    (root / "cut.dcm").write_bytes((DCM / "CT_small.dcm").read_bytes()[:100])  # cut inside the file meta
    recs = {r.origin: r for r in records("dicom", root)}
    assert recs["notes.dcm"].problem.startswith("not a DICOM file: notes.dcm")
    assert "cut.dcm" in recs["cut.dcm"].problem
    assert "no image" in recs["rtplan_truncated.dcm"].problem
    with pytest.raises(RecordError, match="truncated"):
        dicom.load_pixels(recs["MR_truncated.dcm"], CFG)


def test_size_limits_refuse_before_decoding(tmp_path, monkeypatch):
    root = folder(tmp_path, DCM, "CT_small.dcm")
    [rec] = records("dicom", root)
    monkeypatch.setattr(dicom, "pixel_array", lambda *a, **k: pytest.fail("decoded before the size check"))
    with pytest.raises(RecordError, match="decompression bomb"):
        dicom.load_pixels(rec, CurateCfg(max_pixels=100 * 100))


# ---------------------------------------------------------------- NIfTI

def test_nifti_middle_slice_is_canonical_axial(tmp_path):
    root = folder(tmp_path, NII, "anatomical.nii")  # stored LAS: must be flipped to RAS
    [rec] = records("nifti", root)
    assert (rec.key, rec.origin, rec.group, rec.caption, rec.problem) == \
        ("anatomical.nii#axis2-slice12", "anatomical.nii", "anatomical", "", None)
    a = nifti.load_pixels(rec, CFG)
    assert_rgb8(a, (41, 33))
    canon = np.asarray(nib.as_closest_canonical(nib.load(root / "anatomical.nii")).dataobj, dtype=float)
    assert np.array_equal(a[..., 0], percentile_window(np.rot90(canon[:, :, 12]), (0.5, 99.5)))


def test_nifti_4d_evenly_spaced_slices_and_bad_indices(tmp_path):
    root = folder(tmp_path, NII, "example4d.nii.gz")  # (128, 96, 24, 2): volume 0 is used
    recs = records("nifti", root, slices=3)
    assert [r.loc["slice"] for r in recs] == [5, 12, 18]
    imgs = [nifti.load_pixels(r, CFG) for r in recs]
    for a in imgs:
        assert_rgb8(a, (96, 128))
    assert len({a.tobytes() for a in imgs}) == 3
    [bad] = records("nifti", root, slices=[0, 99])
    assert "out of range" in bad.problem and "example4d.nii.gz" in bad.problem


def test_nifti_captions_modality_and_bad_files(tmp_path):
    root = folder(tmp_path, NII, "anatomical.nii", "standard.nii.gz")
    (root / "standard.txt").write_text("Synthetic standard volume", encoding="utf-8")
    (root / "broken.nii").write_text("not a nifti file")
    recs = records("nifti", root, axis=0, modality="mri",
                   caption_template="{modality} {axis} slice {slice} of {name}")
    by = {r.origin: r for r in recs}
    assert by["anatomical.nii"].caption == "mri sagittal slice 16 of anatomical"
    assert by["anatomical.nii"].modality == "mri"
    assert by["standard.nii.gz"].caption == "Synthetic standard volume"
    assert by["broken.nii"].problem.startswith("not a NIfTI file: broken.nii")
    with pytest.raises(ValueError, match="caption_template"):
        records("nifti", root, caption_template="{patient}")


def test_nifti_nan_safe_subject_group_and_size_limit(tmp_path):
    data = np.random.default_rng(0).normal(size=(32, 24, 20)).astype(np.float32)
    data[:4] = np.nan
    sub = tmp_path / "bids" / "sub-07" / "anat"
    sub.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), sub / "sub-07_T1w.nii.gz")
    [rec] = records("nifti", tmp_path / "bids")
    assert rec.group == "sub-07" and rec.key == "sub-07/anat/sub-07_T1w.nii.gz#axis2-slice10"
    assert_rgb8(nifti.load_pixels(rec, CFG), (24, 32))
    with pytest.raises(RecordError, match="decompression bomb"):
        nifti.load_pixels(rec, CurateCfg(max_pixels=100))


def test_deflated_dicom_decodes_and_its_inflated_size_is_capped(tmp_path):
    root = folder(tmp_path, DCM, "image_dfl.dcm")
    [rec] = records("dicom", root)
    a = dicom.load_pixels(rec, CFG)  # pixel_array(path) cannot read a deflated stream: the reader inflates it
    assert np.array_equal(a[..., 0], window(pydicom.dcmread(root / "image_dfl.dcm").pixel_array, 0, 255))
    small = CurateCfg(max_inflated_bytes=100_000)  # the dataset inflates to about 262 kB
    with pytest.raises(RecordError, match="image_dfl.dcm inflates past max_inflated_bytes 100000"):
        dicom.load_pixels(rec, small)
    [refused] = dicom.iter_records(SourceCfg(name="s", kind="dicom", path=str(root)), root, small)
    assert refused.problem == "deflated DICOM too large: image_dfl.dcm inflates past max_inflated_bytes 100000"


@pytest.mark.parametrize("kind,src,name", [("dicom", DCM, "CT_small.dcm"), ("nifti", NII, "anatomical.nii"),
                                           ("volume", NII, "anatomical.nii")])
def test_a_caption_sidecar_that_is_not_utf8_quarantines_its_record_by_name(tmp_path, kind, src, name):
    root = folder(tmp_path, src, name)
    stem = name.rsplit(".", 1)[0]
    (root / f"{stem}.txt").write_bytes(b"CT of the chest, caf\xe9")
    (rec,) = records(kind, root)
    assert rec.problem == f"invalid UTF-8 in the caption sidecar of {name} (byte 20)"


@pytest.mark.parametrize("kind", ["nifti", "volume"])
def test_slice_indices_out_of_range_quarantine_the_volume_by_name(tmp_path, kind):
    root = folder(tmp_path, NII, "anatomical.nii")
    (rec,) = records(kind, root, slices=[0, 999])
    assert rec.problem.startswith("slice indices [999] out of range for anatomical.nii (")
