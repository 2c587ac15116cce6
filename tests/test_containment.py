"""Containment: a symlink planted under a source root that points outside it is refused by every reader, by name,
and what it points at (a fake credentials file) never reaches the curated store or the quarantine."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.curate import curate
from mmkd.data.manifest import read_manifest

SECRET = "AKIAFAKECREDENTIALh3 aws_secret_access_key=fake/Containment+Key"


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def _outside(tmp: Path) -> dict[str, Path]:
    """Files outside the data root: the credentials, and a DICOM, a NIfTI and a tar that carry them."""
    out = tmp / "outside"
    out.mkdir()
    (out / "credentials").write_text(SECRET)
    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data/test_files/CT_small.dcm")
    ds.StudyDescription = SECRET[:64]
    ds.save_as(out / "secret.dcm")
    nib.save(nib.Nifti1Image(np.arange(16 * 16 * 8, dtype=np.int16).reshape(16, 16, 8), np.eye(4)), out / "v.nii.gz")
    with tarfile.open(out / "secret.tar", "w") as tar:
        for name, data in (("s.txt", SECRET.encode()), ("s.png", (tmp / "data/good/ok.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"credentials": out / "credentials", "dcm": out / "secret.dcm", "nii": out / "v.nii.gz",
            "tar": out / "secret.tar"}


def _plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _folder(data: Path, out: dict) -> tuple[list[SourceCfg], dict, int]:
    """An image and a caption sidecar that point outside."""
    _plant(data / "good" / "img.png", out["credentials"])
    (data / "good" / "img.txt").write_text("a caption for a symlinked image")
    _png(data / "good" / "cap.png", 2)
    _plant(data / "good" / "cap.txt", out["credentials"])
    return [], {("good", "img.png"): "img.png", ("good", "cap.png"): "cap.txt"}, 1


def _manifest(data: Path, out: dict) -> tuple[list[SourceCfg], dict, int]:
    """An image path that stays inside the folder but resolves outside, and a symlinked manifest.jsonl."""
    _png(data / "man" / "a.png", 3)
    _plant(data / "man" / "b.png", out["credentials"])
    (data / "man" / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "an inside image"}) + "\n"
                                          + json.dumps({"image": "b.png", "caption": "a symlinked image"}) + "\n")
    _plant(data / "mandir" / "manifest.jsonl", out["credentials"])
    return ([SourceCfg(name="man", kind="manifest", path="man/m.jsonl"),
             SourceCfg(name="mandir", kind="manifest", path="mandir")],
            {("man", "b.png"): "b.png", ("mandir", "manifest.jsonl"): "manifest.jsonl"}, 2)


def _webdataset(data: Path, out: dict) -> tuple[list[SourceCfg], dict, int]:
    """A shard that points outside."""
    _plant(data / "wds" / "000.tar", out["tar"])
    return [SourceCfg(name="wds", kind="webdataset", path="wds")], {("wds", "000.tar"): "000.tar"}, 1


def _dicom(data: Path, out: dict) -> tuple[list[SourceCfg], dict, int]:
    """A file that points outside, and a caption sidecar that does."""
    _plant(data / "dcm" / "out.dcm", out["dcm"])
    shutil.copy(Path(pydicom.__file__).parent / "data/test_files/MR_small.dcm", data / "dcm" / "mr.dcm")
    _plant(data / "dcm" / "mr.txt", out["credentials"])
    return [SourceCfg(name="dcm", kind="dicom", path="dcm")], {("dcm", "out.dcm"): "out.dcm",
                                                                ("dcm", "mr.dcm"): "mr.txt"}, 1


def _nifti(data: Path, out: dict) -> tuple[list[SourceCfg], dict, int]:
    """A volume that points outside, and a caption sidecar that does."""
    _plant(data / "nii" / "out.nii.gz", out["nii"])
    nib.save(nib.Nifti1Image(np.arange(16 * 16 * 8, dtype=np.int16).reshape(16, 16, 8), np.eye(4)),
             data / "nii" / "in.nii.gz")
    _plant(data / "nii" / "in.txt", out["credentials"])
    return ([SourceCfg(name="nii", kind="nifti", path="nii", caption_template="{modality} slice {slice} of {name}")],
            {("nii", "out.nii.gz"): "out.nii.gz", ("nii", "in.nii.gz"): "in.txt"}, 1)


@pytest.mark.parametrize("plant", [_folder, _manifest, _webdataset, _dicom, _nifti], ids=lambda f: f.__name__[1:])
def test_a_symlink_out_of_the_source_root_is_refused_and_never_read(plant, tmp_path):
    data = tmp_path / "data"
    _png(data / "good" / "ok.png", 1)
    (data / "good" / "ok.txt").write_text("a fine chest radiograph")
    sources, escapes, kept = plant(data, _outside(tmp_path))
    cfg = CurateCfg(workers=0, split_fractions={"train": 1.0, "probe": 0.0, "test": 0.0},
                    sources=[SourceCfg(name="good", kind="folder", path="good"), *sources])
    summary = curate(data, tmp_path / "store", cfg)
    assert summary["kept"] == kept  # the good records; every record that touched a symlink out is refused
    q = {(r["source"], r["key"]): r["reason"] for r in read_manifest(tmp_path / "store" / "quarantine.jsonl")}
    for key, name in escapes.items():
        assert key in q, (key, sorted(q))
        assert q[key].startswith("path escapes the source root") and name in q[key], (key, q[key])
    for f in (tmp_path / "store").rglob("*"):  # nothing of the credentials in any byte of the store
        if f.is_file():
            raw = f.read_bytes()
            assert SECRET[:16].encode() not in raw and b"AKIAFAKE" not in raw, f
