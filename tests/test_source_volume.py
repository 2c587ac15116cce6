"""The volume source (SimpleITK) on real NRRD volumes (pyradiomics' sdist), NIfTI (nibabel's) and DICOM series
(pydicom's), plus tiny generated files for the edge cases and a child process measuring peak RSS."""

import json
import locale
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.imaging import RecordError, percentile_window, window
from mmkd.data.sources import iter_source, nifti, volume

SAMPLES = Path(__file__).parents[1] / ".cache/samples/pyradiomics"
NII = Path(nib.__file__).parent / "tests/data"
SERIES = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests"
CFG = CurateCfg()
SMALL = CurateCfg(min_side=4)  # pydicom's sample series are 16x16 with 4-5 slices


def sample(name: str) -> Path:
    path = SAMPLES / name
    assert path.exists(), f"{path} missing: run `bash tests/fetch_samples.sh` (make test runs it)"
    return path


def records(root: Path, cfg=CFG, **kw) -> list:
    return list(iter_source(SourceCfg(name="s", kind="volume", path=str(root), **kw), root, cfg))


def pixels(root: Path, cfg=CFG, **kw) -> list[np.ndarray]:
    recs = records(root, cfg, **kw)
    assert all(r.problem is None for r in recs), [r.problem for r in recs]
    return [volume.load_pixels(r, cfg) for r in recs]


def reference(path: Path, axis: int, i: int, percentiles=(0.5, 99.5)) -> np.ndarray:
    """The whole volume read and reoriented by SimpleITK, sliced as the nifti source shows a canonical slice."""
    xyz = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS")).transpose(2, 1, 0)
    return percentile_window(np.rot90(np.take(xyz, i, axis=axis).astype(np.float64)), percentiles)


def one(tmp_path: Path, src: Path, name: str | None = None) -> Path:
    root = tmp_path / "src"
    root.mkdir(exist_ok=True)
    shutil.copy(src, root / (name or src.name))
    return root


# ---------------------------------------------------------------- real files

@pytest.mark.parametrize("name", ["brain1_image.nrrd", "lung1_image.nrrd"])
def test_real_nrrd_slices_match_the_whole_volume_reoriented(tmp_path, name):
    root = one(tmp_path, sample(name))
    for axis in (0, 1, 2):
        recs = records(root, axis=axis, slices=3)
        assert len(recs) == 3 and all(r.problem is None for r in recs)
        for r in recs:
            assert r.key == f"{name}#axis{axis}-slice{r.loc['slice']}" and r.origin == name
            a = volume.load_pixels(r, CFG)
            assert a.dtype == np.uint8 and np.array_equal(a[..., 0], a[..., 2])
            assert np.array_equal(a[..., 0], reference(root / name, axis, r.loc["slice"]))
    [brain] = records(root) if name.startswith("brain") else [None]
    if brain is not None:  # its y direction is stored flipped (space directions (0,-0.78,0)): LPS -> L A S
        assert brain.raw["axcodes"] == "LAS" and brain.raw["shape"] == [256, 256, 25]


def test_real_ct_nrrd_is_windowed_by_percentiles(tmp_path):
    root = one(tmp_path, sample("lung1_image.nrrd"))
    [a] = pixels(root)
    assert a.shape == (512, 512, 3) and len(np.unique(a)) > 100
    [b] = pixels(root, window_percentiles=(0.0, 100.0))
    assert not np.array_equal(a, b)  # the window parameter reaches the pixels


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_nifti_is_bit_identical_to_the_nifti_source(tmp_path, name):
    root = one(tmp_path, NII / name)
    for axis in (0, 1, 2):
        kw = {"axis": axis, "slices": 3}
        ours = records(root, **kw)
        theirs = list(iter_source(SourceCfg(name="s", kind="nifti", path=str(root), **kw), root))
        assert [r.key for r in ours] == [r.key for r in theirs]
        for r, t in zip(ours, theirs):
            assert np.array_equal(volume.load_pixels(r, CFG), nifti.load_pixels(t, CFG)), (name, axis, r.key)


def test_formats_written_from_a_real_volume_agree_with_it(tmp_path):
    """The real CT written by SimpleITK as MHA, MHD+raw and NIfTI slices to the same pixels as the NRRD; the NIfTI,
    read by nibabel's nifti source, agrees too (ITK's LPS and nibabel's RAS are one orientation)."""
    root = one(tmp_path, sample("breast1_image.nrrd"))
    img = sitk.ReadImage(str(root / "breast1_image.nrrd"))
    for out in ("b.mha", "b.mhd", "b.nii.gz"):
        sitk.WriteImage(img, str(root / out), useCompression=out != "b.mhd")
    assert (root / "b.raw").exists()
    recs = records(root, axis=1, slices=[10, 60])
    by = {}
    for r in recs:
        assert r.problem is None, r.problem
        by.setdefault(r.loc["slice"], []).append(volume.load_pixels(r, CFG))
    assert sorted(by) == [10, 60] and all(len(v) == 4 for v in by.values())
    for planes in by.values():
        assert all(np.array_equal(planes[0], p) for p in planes[1:])
    theirs = list(iter_source(SourceCfg(name="s", kind="nifti", path=str(root / "b.nii.gz"), axis=1,
                                        slices=[10, 60]), root))
    assert [np.array_equal(nifti.load_pixels(t, CFG), by[t.loc["slice"]][0]) for t in theirs] == [True, True]


def test_pydicoms_series_become_volumes_and_the_rest_is_quarantined(tmp_path):
    recs = records(SERIES, SMALL)
    good = [r for r in recs if r.problem is None]
    # CT5N (5 slices) and CT2 (4 slices): one record each (middle slice); every other image is not a volume
    assert sorted(r.key.split("#")[0] for r in good) == ["77654033/CT2", "98892001/CT5N"]
    bad = {r.origin: r.problem for r in recs if r.problem}
    assert "single image" in bad["98892003/MR1/4919"] and "98892003/MR1/4919" in bad["98892003/MR1/4919"]
    assert "another ImageOrientationPatient" in bad["98892003/MR700/4467"]
    assert "no ImagePositionPatient" in bad["77654033/CR1/6154"]
    assert not any("DICOMDIR" in o for o in bad)  # the file-set index is no image and no error
    ct5 = next(r for r in good if r.key.startswith("98892001/CT5N"))
    assert (ct5.group, ct5.modality, ct5.raw["files"], ct5.raw["shape"]) == ("98890234", "ct", 5, [16, 16, 5])
    assert ct5.caption == "CT image, axial slice, SmartScore - Gated 0.5 sec"
    assert "98890234" not in json.dumps([ct5.raw, ct5.key, ct5.origin])  # the PatientID only as the group
    # the series' files are stored with descending z: the middle canonical slice (2 of 0..4) is the 3rd lowest
    files = sorted(SERIES.glob("98892001/CT5N/*"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    assert ct5.origin == files[2].relative_to(SERIES).as_posix() and ct5.loc["dicom_window"] == [40.0, 400.0, "LINEAR"]
    ds = pydicom.dcmread(files[2])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ras = hu.T[::-1, ::-1]  # [rows, cols] run along P and L (identity cosines): RAS [x, y] flips both
    expect = window(np.rot90(ras), 40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2)
    assert np.array_equal(volume.load_pixels(ct5, SMALL)[..., 0], expect)
    [pct] = [r for r in records(SERIES, SMALL, volume_window="percentile", volume_group_by="study")
             if r.problem is None and r.key.startswith("98892001/CT5N")]
    assert pct.loc["dicom_window"] is None and pct.group == ds.StudyInstanceUID
    assert np.array_equal(volume.load_pixels(pct, SMALL)[..., 0], percentile_window(np.rot90(ras), (0.5, 99.5)))


# ---------------------------------------------------------------- generated edge cases

def write_series(root: Path, vol: np.ndarray, names: list[str], spacing: float = 2.5) -> None:
    """vol[k] at z = k * spacing, written by SimpleITK (GDCM) under names[k], instance numbers reversed."""
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        im = sitk.GetImageFromArray(vol[k])
        for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.7"), ("0020|000d", "1.2.826.0.1.3680043.2.9"),
                           ("0008|0060", "CT"), ("0010|0020", "PAT-7"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", f"0\\0\\{spacing * k}"), ("0020|0013", str(len(names) - k)),
                           ("0028|1050", "40"), ("0028|1051", "400")):
            im.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(root / name))
        saved = locale.setlocale(locale.LC_ALL)
        try:
            writer.Execute(im)
        finally:  # GDCM's DICOM writer leaves the process in the C locale: later text I/O would be ASCII
            locale.setlocale(locale.LC_ALL, saved)


def test_series_order_comes_from_positions_and_planes_match_the_volume(tmp_path):
    vol = np.random.default_rng(0).integers(-1000, 1000, (20, 18, 24)).astype(np.int16)  # [z, rows, cols]
    names = [f"{n:02d}.dcm" for n in np.random.default_rng(1).permutation(20)]  # names and instances disagree
    write_series(tmp_path / "src/ser", vol, names)
    ref = tmp_path / "ref/v.mha"
    ref.parent.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(ref))  # the same voxels, identity direction
    for axis in (0, 1, 2):
        for mode in ("percentile",):
            ours = records(tmp_path / "src", axis=axis, slices=[3, 9], volume_window=mode)
            refs = records(ref.parent, axis=axis, slices=[3, 9])
            assert [r.problem for r in ours] == [None, None] and ours[0].key.startswith("ser#series-")
            for r, t in zip(ours, refs):
                assert np.array_equal(volume.load_pixels(r, CFG), volume.load_pixels(t, CFG)), (axis, r.key)
    [mid] = records(tmp_path / "src")  # the DICOM window, in HU
    assert mid.group == "PAT-7" and mid.origin == f"ser/{names[10]}"
    assert np.array_equal(volume.load_pixels(mid, CFG)[..., 0],
                          window(np.rot90(vol[10].T[::-1, ::-1].astype(float)), 40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2))


def test_a_series_with_preamble_less_files_is_one_volume(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(SERIES / "98892001/CT5N", root / "ct")
    [whole] = records(root, SMALL)
    for name in ("2062", "2693"):  # old exports: the data set from byte 0, no preamble, no DICM
        data = (root / "ct" / name).read_bytes()
        (root / "ct" / name).write_bytes(data[132:])
    [cut] = records(root, SMALL)
    assert cut.problem is None and cut.origin == "ct/2693" and cut.raw["files"] == 5
    assert np.array_equal(volume.load_pixels(cut, SMALL), volume.load_pixels(whole, SMALL))
    [side] = records(root, SMALL, axis=0, slices=[3])  # a reformatted plane reads every file, those two too
    [ref] = [r for r in records(SERIES / "98892001", SMALL, axis=0, slices=[3]) if r.problem is None]
    assert np.array_equal(volume.load_pixels(side, SMALL), volume.load_pixels(ref, SMALL))


def test_a_non_image_object_in_a_series_folder_is_refused_by_its_class(tmp_path):
    vol = np.random.default_rng(6).integers(0, 500, (5, 16, 16)).astype(np.int16)
    write_series(tmp_path / "src/ser", vol, [f"{k}.dcm" for k in range(5)])
    ds = pydicom.dcmread(tmp_path / "src/ser/4.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    ds.save_as(tmp_path / "src/ser/4.dcm")
    recs = records(tmp_path / "src")
    bad = {r.origin: r.problem for r in recs if r.problem}
    assert list(bad) == ["ser/4.dcm"] and "Segmentation Storage" in bad["ser/4.dcm"]
    [good] = [r for r in recs if r.problem is None]
    assert good.raw["files"] == 4


def test_repeated_positions_and_two_series_in_one_folder(tmp_path):
    vol = np.random.default_rng(2).integers(0, 500, (4, 16, 16)).astype(np.int16)
    write_series(tmp_path / "src/a", vol, ["1.dcm", "2.dcm", "3.dcm", "4.dcm"], spacing=0.0)
    recs = records(tmp_path / "src")
    assert len(recs) == 1 and "several images at the position" in recs[0].problem
    other = tmp_path / "src/b"
    write_series(other, vol, ["5.dcm", "6.dcm", "7.dcm", "8.dcm"])
    for f in other.iterdir():  # a second series in the same folder as the first, with its own UID
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.8"
        ds.save_as(tmp_path / "src/a" / f.name)
    shutil.rmtree(other)
    recs = records(tmp_path / "src")
    assert sorted(bool(r.problem) for r in recs) == [False, True]


def write_mha(path: Path, shape_xyz: tuple, payload: bytes = b"", extra: str = "", data_file: str = "LOCAL") -> None:
    header = (f"ObjectType = Image\nNDims = {len(shape_xyz)}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"DimSize = {' '.join(map(str, shape_xyz))}\nElementType = MET_SHORT\n{extra}"
              f"ElementDataFile = {data_file}\n")
    path.write_bytes(header.encode() + payload)


def test_unreadable_and_refused_files_are_quarantined_naming_them(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    vol = sitk.GetImageFromArray(np.arange(32 * 32 * 8, dtype=np.int16).reshape(8, 32, 32))
    sitk.WriteImage(vol, str(root / "whole.mha"))
    data = (root / "whole.mha").read_bytes()
    (root / "truncated.mha").write_bytes(data[: len(data) // 3])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(root / "flat.mha"))
    write_mha(root / "huge.mha", (100000, 100000, 50))  # a header promising 1e12 voxels, no data
    (root / "noise.nrrd").write_bytes(b"NRRD0004\nthis is not a header")
    sitk.WriteImage(sitk.Compose([vol, vol, vol]), str(root / "rgb.mha"))
    outside = tmp_path / "outside"
    outside.mkdir()
    sitk.WriteImage(vol, str(outside / "secret.mha"))
    (root / "link.mha").symlink_to(outside / "secret.mha")
    shutil.copy(outside / "secret.mha", outside / "secret.raw")
    write_mha(root / "detached.mhd", (32, 32, 8), data_file="../outside/secret.raw")
    (root / "nonl.mhd").write_bytes((root / "detached.mhd").read_bytes().rstrip(b"\n"))  # no final newline
    shutil.copy(SERIES / "98892001/CT5N/2062", outside / "slice")
    (root / "evil.dcm").symlink_to(outside / "slice")  # a DICOM file outside: never opened
    (root / "fake.dcm").write_bytes(b"not dicom")
    (root / "README").write_text("ignored: no suffix, no DICM prefix")
    recs = {r.origin: r for r in records(root)}
    problems = {k: r.problem for k, r in recs.items()}
    assert problems["whole.mha"] is None and problems["truncated.mha"] is None  # the header is whole
    assert "not a volume: flat.mha is 2-D (32, 32)" in problems["flat.mha"]
    assert problems["huge.mha"].startswith("decompression bomb: 100000x100000")
    assert "noise.nrrd" in problems["noise.nrrd"]
    assert "not a scalar volume: rgb.mha has 3 component(s)" in problems["rgb.mha"]
    assert problems["link.mha"] == "path escapes the source root: link.mha"
    assert "path escapes the source root: data file '../outside/secret.raw' of detached.mhd" == problems["detached.mhd"]
    assert problems["nonl.mhd"] == "path escapes the source root: data file '../outside/secret.raw' of nonl.mhd"
    assert problems["evil.dcm"] == "path escapes the source root: evil.dcm"
    assert "not a DICOM file: fake.dcm" in problems["fake.dcm"] and "README" not in problems
    with pytest.raises(RecordError, match="cannot read voxels of truncated.mha .truncated or corrupt"):
        volume.load_pixels(recs["truncated.mha"], CFG)
    assert volume.load_pixels(recs["whole.mha"], CFG).shape == (32, 32, 3)


def test_four_d_takes_volume_zero_and_nrrd_is_capped_by_volume_max_bytes(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    v4 = np.random.default_rng(3).integers(0, 900, (2, 6, 20, 24)).astype(np.int16)  # [t, z, y, x]
    nib.save(nib.Nifti1Image(v4.transpose(3, 2, 1, 0), np.eye(4)), root / "four.nii.gz")
    three = sitk.GetImageFromArray(v4[0])
    three.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # nibabel's identity affine is RAS; ITK's space LPS
    sitk.WriteImage(three, str(root / "three.mha"))
    four, three = pixels(root)
    assert np.array_equal(four, three)
    sitk.WriteImage(sitk.GetImageFromArray(v4[0]), str(root / "big.nrrd"))
    [big] = [r for r in records(root, volume_max_bytes=v4[0].nbytes - 1) if r.origin == "big.nrrd"]
    assert big.problem.startswith("volume too large to read whole: big.nrrd") and "volume_max_bytes" in big.problem
    assert all(r.problem is None for r in records(root, volume_max_bytes=v4[0].nbytes))


def test_captions_sidecar_template_and_no_identifiers(tmp_path):
    vol = np.random.default_rng(4).integers(0, 500, (5, 16, 16)).astype(np.int16)
    write_series(tmp_path / "src/ser", vol, [f"{k}.dcm" for k in range(5)])
    [r] = records(tmp_path / "src", caption_template="{Modality} {axis} slice {slice} of {name}, patient {PatientID}")
    assert r.caption == "CT axial slice 2 of ser, patient"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "src/v.nrrd"))
    (tmp_path / "src/v.txt").write_text("MR of the knee, sagittal")
    recs = records(tmp_path / "src", caption_template="{name} {axis} {slice} {Modality}")
    assert sorted(r.caption for r in recs) == ["MR of the knee, sagittal", "ser axial 2 CT"]
    with pytest.raises(ValueError, match="bad volume caption_template"):
        SourceCfg(name="s", kind="volume", caption_template="{name!z}")


def test_curation_keeps_slices_and_stores_only_a_token_of_the_patient(tmp_path):
    from mmkd.data.curate import curate

    vol = np.random.default_rng(5).integers(-900, 900, (12, 40, 48)).astype(np.int16)
    write_series(tmp_path / "data/ct/ser", vol, [f"{k}.dcm" for k in range(12)])
    cfg = CurateCfg(workers=0, decoded_sizes=[], check_contamination=False, durable=False, near_dup_bits=-1,
                    sources=[SourceCfg(name="ct", kind="volume", path="ct", slices=3, licence="CC0-1.0")])
    curate(tmp_path / "data", tmp_path / "out", cfg)
    live = next(p for p in (tmp_path / "out").rglob("manifest.jsonl"))
    rows = [json.loads(line) for line in live.read_text().splitlines()]
    assert len(rows) == 3 and {r["kind"] for r in rows} == {"volume"} and len({r["group"] for r in rows}) == 1
    assert {r["modality"] for r in rows} == {"ct"} and (rows[0]["width"], rows[0]["height"]) == (48, 40)
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*.json*"))
    assert "PAT-7" not in text and "1.2.826.0.1.3680043.2.1125.7" not in text  # PatientID, SeriesInstanceUID


def test_settings_are_validated_and_the_params_example_loads():
    with pytest.raises(ValueError, match="volume_window"):
        SourceCfg(name="s", kind="volume", volume_window="auto")
    with pytest.raises(ValueError, match="volume_max_bytes"):
        SourceCfg(name="s", kind="volume", volume_max_bytes=0)
    import yaml

    lines = (Path(__file__).parents[1] / "params.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "kind: volume" in line)
    # the commented example, uncommented: "    # - {...,   # note" / "    #    ...}  # note"
    example = " ".join(re.sub(r"\s+#\s.*$", "", line.split("#", 1)[1]).lstrip(" -")
                       for line in lines[start:start + 2])
    spec = SourceCfg(**yaml.safe_load(example))
    assert (spec.kind, spec.slices, spec.volume_group_by) == ("volume", 5, "patient")


# ---------------------------------------------------------------- memory

CHILD = """
import json, sys
from pathlib import Path
from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.sources import volume

def hwm():  # this process's own peak (ru_maxrss would carry over the peak of the process that forked it)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

root = Path(sys.argv[1])
cfg = CurateCfg(max_pixels=10**9, max_input_side=10**5)
recs = [r for axis in (2, 0) for r in volume.iter_records(SourceCfg(name="s", kind="volume", path=str(root), axis=axis),
                                                          root, cfg)]
before = hwm()
shapes = [list(volume.load_pixels(r, cfg).shape) for r in recs]
print(json.dumps({"before_kib": before, "after_kib": hwm(), "shapes": shapes, "problems": [r.problem for r in recs]}))
"""


def test_slicing_a_large_metaimage_reads_only_the_slice(tmp_path):
    """512x512x600 int16 (300 MiB, a sparse file): the child's peak RSS grows by far less than the volume (the same
    volume as raw NRRD, which ITK reads whole, grows it by ~330 MiB)."""
    root = tmp_path / "big"
    root.mkdir()
    nbytes = 512 * 512 * 600 * 2
    write_mha(root / "ct.mha", (512, 512, 600))
    with open(root / "ct.mha", "r+b") as fh:
        fh.truncate(fh.seek(0, os.SEEK_END) + nbytes)
    out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["problems"] == [None, None] and got["shapes"] == [[512, 512, 3], [600, 512, 3]]
    grew = (got["after_kib"] - got["before_kib"]) * 1024
    assert grew < nbytes / 8, f"peak RSS grew by {grew / 2**20:.0f} MiB slicing a {nbytes / 2**20:.0f} MiB volume"
