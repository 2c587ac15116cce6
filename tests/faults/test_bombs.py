"""Bombs: small inputs that inflate or claim huge sizes, each curated in a forked child whose peak RSS is bounded.

Every bomb is real: a deflated DICOM whose dataset inflates to hundreds of MiB, a .nii.gz whose header extension
does, sparse files and tar members that claim 64-300 MiB, a PNG of 144 M pixels. The child runs the whole curation
(workers=0: listing and decoding in that one process); its peak RSS comes from wait4's rusage, the baseline from
its own /proc/self/status right after the fork. The bomb is quarantined with a reason naming it and the limit,
the good record beside it is kept, and the run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.curate import curate
from mmkd.data.manifest import read_manifest

MiB = 2**20
BOUND_MIB = 48  # peak RSS over the child's baseline; every bomb below would cost at least 64 MiB unguarded
_ZEROS = bytes(MiB)


# ------------------------------------------------------------------ bomb builders (shared with the measurement)

def _repeated_deflate(head: bytes, zero_mib: int, wbits: int) -> tuple[bytes, bytes, bytes]:
    """(prefix, block, tail) of a deflate stream of head + zero_mib MiB of zeros: the block is one MiB of zeros
    after a full flush, so repeating it zero_mib times is a valid stream built in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    prefix = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(_ZEROS) + c.flush(zlib.Z_FULL_FLUSH)
    return prefix, block, c.flush()


def deflated_dicom(path: Path, pixel_mib: int) -> Path:
    """A Deflated Explicit VR Little Endian DICOM whose dataset inflates to pixel_mib MiB of Pixel Data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyDescription = "OT", "deflate bomb"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = pixel_mib
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_mib * MiB)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    prefix, block, tail = _repeated_deflate(head, pixel_mib, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + meta.getvalue() + prefix)
        for _ in range(pixel_mib):
            fh.write(block)
        fh.write(tail)
    return path


def nifti_with_extension(path: Path, ext_mib: int) -> Path:
    """A .nii.gz of a 16x16x4 volume with one header extension of ext_mib MiB of zeros (gzip, built by repetition)."""
    img = nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.eye(4))
    esize = ext_mib * MiB + 16
    img.header["vox_offset"] = 352 + esize
    head = img.header.binaryblock + struct.pack("<4B2i", 1, 0, 0, 0, esize, 0) + bytes(8)
    prefix, block, _ = _repeated_deflate(head, ext_mib, -zlib.MAX_WBITS)
    data = bytes(16 * 16 * 4)
    c_tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = c_tail.compress(data) + c_tail.flush()
    crc = zlib.crc32(head)
    for _ in range(ext_mib):
        crc = zlib.crc32(_ZEROS, crc)
    crc = zlib.crc32(data, crc)
    size = len(head) + ext_mib * MiB + len(data)
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + prefix)
        for _ in range(ext_mib):
            fh.write(block)
        fh.write(tail + struct.pack("<II", crc, size & 0xFFFFFFFF))
    return path


def sparse_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A tar whose int-sized members are holes: a member can claim hundreds of MiB and cost no disk."""
    with open(path, "wb") as fh:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            fh.write(info.tobuf(tarfile.USTAR_FORMAT))
            if isinstance(data, int):
                fh.seek(data, 1)
            else:
                fh.write(data)
            fh.seek(-info.size % 512, 1)
        fh.write(b"\0" * 1024)
    return path


def sparse_file(path: Path, prefix: bytes, hole: int, suffix: bytes = b"") -> Path:
    with open(path, "wb") as fh:
        fh.write(prefix)
        fh.seek(hole, 1)
        fh.write(suffix or b"\0")
    return path


def png_bomb(path: Path, side: int = 12_000) -> Path:
    """A valid 1-bit PNG of side x side pixels (144 M at 12000: over max_pixels 100 M), about 20 kB."""
    row = b"\0" + bytes((side + 7) // 8)
    raw = zlib.compressobj(9)
    idat = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def good_png(path: Path, seed: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


# ------------------------------------------------------------------ the child

def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def curate_in_child(data_root: Path, out: Path, cfg: CurateCfg) -> dict:
    """curate() in a forked child; {"summary" or "error", "base_kib", "peak_kib"} (peak: wait4's ru_maxrss)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            base = _vm("VmRSS")
            try:
                msg = {"summary": curate(data_root, out, cfg)}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
                msg = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps({**msg, "base_kib": base}, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status, usage = os.wait4(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child died: status {status}"
    return {**json.loads(data), "peak_kib": usage.ru_maxrss}


# ------------------------------------------------------------------ the bombs

def _folder(root: Path, name: str, caption: bytes | int = b"a good chest radiograph") -> None:
    good_png(root / f"{name}.png", seed=100 + len(name))
    if isinstance(caption, int):
        sparse_file(root / f"{name}.txt", b"huge caption", caption)
    else:
        (root / f"{name}.txt").write_bytes(caption)


def build(kind: str, data: Path) -> tuple[list[SourceCfg], str, str, str, int]:
    """Sources (good ones and the bomb), the bomb's quarantine key, what its reason must name (the limit and the
    record), and how many records are kept."""
    good = SourceCfg(name="good", kind="folder", path="good")
    _folder(data / "good", "ok")
    if kind == "dicom":
        (data / "dcm").mkdir()
        deflated_dicom(data / "dcm" / "bomb.dcm", 300)  # 300 MiB inflated, 300 kB on disk
        shutil.copy(Path(pydicom.__file__).parent / "data/test_files/CT_small.dcm", data / "dcm" / "ct.dcm")
        return [good, SourceCfg(name="b", kind="dicom", path="dcm")], "bomb.dcm", "max_inflated_bytes", "bomb.dcm", 2
    if kind == "nifti":
        (data / "nii").mkdir()
        nifti_with_extension(data / "nii" / "bomb.nii.gz", 64)
        nifti = SourceCfg(name="b", kind="nifti", path="nii")
        return [good, nifti], "bomb.nii.gz", "max_header_bytes", "bomb.nii.gz", 1
    if kind == "tar_caption":
        (data / "wds").mkdir()
        sparse_tar(data / "wds" / "000.tar", [("a.png", good_png(data / "tmp.png", 1)), ("a.txt", 64 * MiB),
                                              ("b.png", good_png(data / "tmp.png", 2)), ("b.txt", b"a fine caption")])
        return [good, SourceCfg(name="b", kind="webdataset", path="wds")], "000.tar:a", "max_sidecar_bytes", "a.txt", 2
    if kind == "tar_image":
        (data / "wds").mkdir()
        sparse_tar(data / "wds" / "000.tar", [("a.png", 300 * MiB), ("a.txt", b"a huge image member"),
                                              ("b.png", good_png(data / "tmp.png", 2)), ("b.txt", b"a fine caption")])
        return [good, SourceCfg(name="b", kind="webdataset", path="wds")], "000.tar:a", "max_file_bytes", "a.png", 2
    if kind == "sidecar":
        _folder(data / "good", "bomb", caption=64 * MiB)
        return [good], "bomb.png", "max_sidecar_bytes", "bomb.txt", 1
    if kind == "manifest_line":
        (data / "man").mkdir()
        good_png(data / "man" / "a.png", 3)
        with open(data / "man" / "m.jsonl", "wb") as fh:
            fh.write(b'{"image": "a.png", "caption": "')
            fh.seek(64 * MiB, 1)
            fh.write(b'"}\n{"image": "a.png", "caption": "the line after the long one"}\n')
        return [good, SourceCfg(name="b", kind="manifest", path="man/m.jsonl")], "line1", "max_line_bytes", "line 1", 2
    if kind == "png":
        png_bomb(data / "good" / "bomb.png")
        (data / "good" / "bomb.txt").write_text("a decompression bomb")
        return [good], "bomb.png", "max_pixels", "12000x12000", 1
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["dicom", "nifti", "tar_caption", "tar_image", "sidecar", "manifest_line", "png"])
def test_bomb_is_refused_before_allocation(kind, tmp_path):
    data = tmp_path / "data"
    sources, key, knob, name, kept = build(kind, data)
    cfg = CurateCfg(workers=0, sources=sources, split_fractions={"train": 1.0, "probe": 0.0, "test": 0.0})
    res = curate_in_child(data, tmp_path / "out", cfg)
    assert "error" not in res, res["error"]
    grew = (res["peak_kib"] - res["base_kib"]) / 1024
    assert grew < BOUND_MIB, f"{kind}: peak RSS grew {grew:.0f} MiB"
    quarantined = {q["key"]: q for q in read_manifest(tmp_path / "out" / "quarantine.jsonl")}
    assert key in quarantined, sorted(quarantined)
    reason = quarantined[key]["reason"]
    assert knob in reason and name in reason, reason
    assert res["summary"]["kept"] == kept  # the good records beside the bomb survive, the run completes


# ------------------------------------------------------------------ malformed files: no reader raises

def test_every_reader_lists_and_loads_all_of_pydicoms_test_files_without_raising():
    """pydicom's own test files (bad VR, no preamble, deflated, truncated, DICOMDIRs, a NumberOfFrames of '1A'),
    read by every reader kind: listing never raises, each file gives at least one record, and every listed
    record either decodes to 8-bit RGB or is refused with a RecordError."""
    from pydicom.data import get_testdata_files

    from mmkd.data.imaging import RecordError
    from mmkd.data.sources import reader

    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    roots = sorted({f.parent for f in files})
    assert len(files) > 150
    cfg, decoded = CurateCfg(), 0
    specs = [("dicom", {"pattern": "*"}), ("nifti", {"pattern": "*"}), ("webdataset", {"pattern": "*"}),
             ("folder", {"pattern": "*"})]
    for kind, kw in specs:
        mod, listed = reader(kind), {}
        for root in roots:
            for rec in mod.iter_records(SourceCfg(name="s", kind=kind, path=str(root), **kw), root):
                listed.setdefault((root, rec.origin.split(":")[0]), []).append(rec)
                if rec.problem is None:
                    try:
                        rgb = mod.load_pixels(rec, cfg)
                    except RecordError:
                        continue
                    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, rec.key
                    decoded += 1
        if kind in ("dicom", "nifti"):  # every file is listed: as its records, or as one record with a problem
            assert {(f.parent, f.name) for f in files} <= set(listed), kind
    assert decoded > 50  # the readable DICOMs really decode
    bad = [r for r in reader("dicom").iter_records(SourceCfg(name="s", kind="dicom", path=str(DCM), pattern="*"), DCM)
           if r.origin == "badVR.dcm"]
    assert bad[0].problem == "bad NumberOfFrames '1A' in DICOM file badVR.dcm (not a number)"
    for f in files:  # every file as a manifest, both formats: bad lines are records with a problem
        for fmt in ("jsonl", "csv"):
            for rec in reader("manifest").iter_records(SourceCfg(name="m", kind="manifest", path=str(f), format=fmt),
                                                       f.parent):
                assert rec.problem or rec.loc, rec


DCM = Path(pydicom.__file__).parent / "data/test_files"


def test_listing_continues_past_a_record_whose_reading_raises(tmp_path):
    """An error listing one file / line names it and the next one is still listed (csv's own field limit too)."""
    from mmkd.data.sources import reader

    root = tmp_path / "dcm"
    root.mkdir()
    ds = pydicom.dcmread(DCM / "CT_small.dcm")
    # a malformed IS, written raw as a broken writer would (pydicom refuses to set it): the listing used to raise
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"x ", 0, False, True)
    ds.save_as(root / "a.dcm")
    shutil.copy(DCM / "CT_small.dcm", root / "b.dcm")
    recs = list(reader("dicom").iter_records(SourceCfg(name="s", kind="dicom", path=str(root)), root))
    assert [(r.origin, r.problem is None) for r in recs] == [("a.dcm", False), ("b.dcm", True)]
    assert "a.dcm" in recs[0].problem and "NumberOfFrames" in recs[0].problem
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,caption\n" f"a.png,{'x' * 200_000}\n" "b.png,a caption after the huge field\n")
    recs = list(reader("manifest").iter_records(SourceCfg(name="m", kind="manifest", path=str(csv_path)), tmp_path))
    assert [(r.line, r.problem is None) for r in recs] == [(2, False), (3, True)]
    assert "field larger than field limit" in recs[0].problem
    recs = list(reader("manifest").iter_records(SourceCfg(name="m", kind="manifest", path=str(csv_path)), tmp_path,
                                                CurateCfg(max_line_bytes=1000)))
    assert [(r.line, r.problem) for r in recs] == [(2, "manifest line too long: line 2 is over max_line_bytes 1000"),
                                                   (3, None)]


def test_a_huge_volume_costs_only_the_slice_it_gives(tmp_path):
    """A NIfTI whose header claims a 128 MiB volume (sparse): curating its middle axial slice reads that slice,
    never the volume (nibabel's array proxy), so the child's RSS grows by far less than the volume."""
    data = tmp_path / "data"
    _folder(data / "good", "ok")
    (data / "nii").mkdir()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 256))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    sparse_file(data / "nii" / "big.nii", hdr.binaryblock + bytes(4), 512 * 512 * 256 * 2 - 1)
    with open(data / "nii" / "big.nii", "r+b") as fh:  # the middle slice has content; the rest is a hole
        fh.seek(352 + 128 * 512 * 512 * 2)
        fh.write(np.random.default_rng(0).integers(0, 3000, (512, 512), dtype=np.int16).tobytes())
    cfg = CurateCfg(workers=0, split_fractions={"train": 1.0, "probe": 0.0, "test": 0.0}, sources=[
        SourceCfg(name="good", kind="folder", path="good"),
        SourceCfg(name="v", kind="nifti", path="nii", caption_template="axial slice {slice} of {name}")])
    res = curate_in_child(data, tmp_path / "out", cfg)
    assert "error" not in res, res["error"]
    q = [r["reason"] for r in read_manifest(tmp_path / "out" / "quarantine.jsonl")]
    assert res["summary"]["kept"] == 2, q  # the slice was read and curated
    grew = (res["peak_kib"] - res["base_kib"]) / 1024
    assert grew < BOUND_MIB, f"peak RSS grew {grew:.0f} MiB for a 128 MiB volume"


if __name__ == "__main__":  # the measurement: python -m tests.faults.test_bombs [dicom400 nifti400 png ...]
    import sys
    import tempfile

    for kind in sys.argv[1:] or ["dicom400", "nifti400"]:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            sources, key, *_ = build(kind.removesuffix("400"), data)
            if kind == "dicom400":  # the measured one: 408 kB on disk, 400 MiB of Pixel Data inflated
                deflated_dicom(data / "dcm" / "bomb.dcm", 400)
            if kind == "nifti400":  # the measured one: 408 kB on disk, a 400 MiB header extension
                nifti_with_extension(data / "nii" / "bomb.nii.gz", 400)
            cfg = CurateCfg(workers=0, sources=sources, split_fractions={"train": 1.0, "probe": 0.0, "test": 0.0})
            res = curate_in_child(data, Path(tmp) / "out", cfg)
            q = {r["key"]: r["reason"] for r in read_manifest(Path(tmp) / "out" / "quarantine.jsonl")}
            print(f"{kind}: peak RSS {res['peak_kib'] >> 10} MiB, {(res['peak_kib'] - res['base_kib']) >> 10} MiB over "
                  f"the child's baseline; {key}: {q.get(key, 'not quarantined')}")
