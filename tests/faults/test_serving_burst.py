"""A burst of bombs and garbage at the real served model (`mlflow models serve` on the smoke run's champion):
every answer a clean 400/413 naming the row, the server still answers, and its peak memory stays bounded."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mmkd.config import ServingCfg
from mmkd.tracking.pyfunc import encode_image_b64

# How much the burst may raise the server's peak RSS. Before serving had limits of its own, ONE of these
# 9000x9000 16-bit PNGs (81 Mpx, under curation's 1e8) raised it by ~2.4 GiB (and took 17 s), and the deflated
# DICOM bomb was inflated whole by pydicom before any check. The served model itself holds about 1 GiB.
GROWTH_BOUND = 768 * 2**20


def png16_bomb(width: int, height: int) -> bytes:
    """A valid 16-bit greyscale PNG of zeros: ~160 kB for 9000x9000, 162 MB of pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + 2 * width)  # filter byte 0, then the row's samples
    per_block = max(1, (4 << 20) // len(row))
    z, parts, left = zlib.compressobj(9), [], height
    while left:
        k = min(left, per_block)
        parts.append(z.compress(row * k))
        left -= k
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def deflated_dicom_bomb(rows: int, cols: int) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose pixel data are zeros: ~160 kB inflating to 162 MB."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    head, body = DicomBytesIO(), DicomBytesIO()
    for f in (head, body):
        f.is_little_endian, f.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    write_dataset(body, ds)
    n = rows * cols * 2
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n))]  # (7FE0,0010) OW
    block = bytes(4 << 20)
    for start in range(0, n, len(block)):
        out.append(z.compress(block[: min(len(block), n - start)]))
    out.append(z.flush())
    return bytes(128) + b"DICM" + head.getvalue() + b"".join(out)


def nifti_gz_bomb(shape=(2048, 2048, 2048)) -> bytes:
    """A .nii.gz whose header declares a 16 GiB int16 volume (the voxels a gzip stream could inflate to)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    return gzip.compress(hdr.binaryblock + bytes(4) + bytes(1 << 16))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, rows: list) -> tuple[int, str]:
    body = json.dumps({"dataframe_split": {"columns": ["image", "text"], "data": rows}}).encode()
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def vm_hwm(pid: int) -> int:
    """The process's peak resident set (VmHWM) as the kernel counts it, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_burst_of_bombs_gets_clean_refusals_and_the_server_stays_small(model_server, smoke_run):
    limits = ServingCfg()  # the smoke run registers the default limits
    good = encode_image_b64(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png, dcm, nii = b64(png16_bomb(9000, 9000)), b64(deflated_dicom_bomb(9000, 9000)), b64(nifti_gz_bomb())
    garbage = b64(b"\x00garbage, not an image" * 50)
    # (rows, expected status, what the message must say)
    cases = [([[png, None]], 413, ["row 0: too large", "9000x9000", "serving.max_pixels"]),
             ([[dcm, None]], 413, ["row 0: too large", "deflated DICOM", "serving.max_image_bytes"]),
             ([[nii, None]], 413, ["row 0: too large", "NIfTI volume", "serving.max_decoded_bytes"]),
             ([[garbage, None]], 400, ["row 0: not an image"]),
             ([[good, "a CT scan"], [png, None]], 413, ["row 1: too large"]),   # a good row does not let a bomb in
             ([[good, None], [garbage, None], [dcm, None]], 400, ["row 1: not an image", "row 2: too large"]),
             ([[good, None]] * (limits.max_rows + 1), 413, [f"{limits.max_rows + 1} rows > serving.max_rows"]),
             ([["%%% not base64 %%%", None]], 400, ["row 0: not base64"]),
             ([[None, "x" * (limits.max_text_chars + 1)]], 413, ["row 0: too large: text of"])]
    url = model_server.url()
    pid = model_server.server_pid()
    before = vm_hwm(pid)
    burst = cases * 3  # 27 requests, 6 at a time: MLflow's request threads decode side by side
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda case: post(url, case[0]), burst))
    for (rows, status, says), (got, body) in zip(burst, answers):
        assert got == status, (says, got, body[:500])
        err = json.loads(body)
        assert set(err) >= {"error_code", "message"} and "stack_trace" not in err, body[:500]
        for text in says:
            assert text in err["message"], (text, err["message"])
        # no trace, no server path, no echo of the request's payload
        for leak in ("Traceback", 'File "', "site-packages", "/tmp", str(smoke_run["root"]), "Failed to predict"):
            assert leak not in body, (leak, body[:500])
        assert len(body) < 2000, body[:500]
    # the server still answers, correctly
    status, body = post(url, [[good, "a chest X-ray"]])
    assert status == 200, body[:500]
    row = json.loads(body)["predictions"][0]
    for key in ("image_embedding", "text_embedding"):
        assert abs(np.linalg.norm(row[key]) - 1) < 1e-5 and len(row[key]) == 128
    growth = vm_hwm(pid) - before
    assert growth < GROWTH_BOUND, f"the burst raised the server's peak RSS by {growth / 2**20:.0f} MiB"
