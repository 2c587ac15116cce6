"""Inference for users: `mmkd predict` / `mmkd embed` on the smoke run's champion; `mlflow models serve` over HTTP."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmkd.cli import app
from mmkd.config import ServingCfg
from mmkd.serving.inputs import decode_bytes, read_image
from mmkd.serving.requests import DecodeGate, RequestError
from mmkd.serving.model import DEFAULT_MODEL
from mmkd.tracking.pyfunc import encode_image_b64
from tests.faults.test_serving_burst import b64, deflated_dicom_bomb, png16_bomb

runner = CliRunner()
LABELS = ["normal", "pneumonia", "effusion"]


def write_dicom(path: Path, gray16: np.ndarray) -> Path:
    """A 12-bit DX DICOM (Part 10 file, no window tags: curation's reader windows it by percentiles)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.Rows, ds.Columns = gray16.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = gray16.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def inputs(smoke_run, tmp_path_factory) -> dict:
    """Smoke test images of known classes, the same X-ray as a DICOM (named by UID, no suffix) and a 16-bit PNG,
    a NIfTI volume in a subfolder, a caption sidecar (not an input) and a broken file."""
    test = smoke_run["root"] / "data" / "images" / "xray" / "test"
    folder = tmp_path_factory.mktemp("inputs")
    pngs = [shutil.copy(test / f"xray-test-{i:05d}.png", folder / f"xray-{i}.png") for i in range(3)]
    gray16 = np.asarray(Image.open(pngs[2]).convert("L"), dtype=np.uint16) * 16  # 12-bit range
    dicom = write_dicom(folder / "1.2.826.0.1.3680043.8.498.1", gray16)
    png16 = folder / "xray-2-16bit.png"
    Image.fromarray(gray16).save(png16)
    import nibabel as nib

    (folder / "mri").mkdir()
    vol = np.random.default_rng(0).normal(100, 20, (40, 40, 9)).astype(np.float32)
    nifti = folder / "mri" / "head.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), nifti)
    (folder / "xray-0.txt").write_text("a caption sidecar, not an input")
    bad = tmp_path_factory.mktemp("bad") / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    return {"folder": folder, "pngs": [Path(p) for p in pngs], "dicom": dicom, "png16": png16, "nifti": nifti,
            "bad": bad}


@pytest.fixture(scope="module")
def pyfunc(smoke_run, tmp_path_factory):
    """The registered champion as MLflow loads it (the reference every path must agree with)."""
    import mlflow

    from mmkd.tracking.pyfunc import _mlflow_uris

    with _mlflow_uris(smoke_run["tracking_uri"]):  # dst_path: MLflow's default is a /tmp folder never removed
        return mlflow.pyfunc.load_model(DEFAULT_MODEL, dst_path=str(tmp_path_factory.mktemp("pyfunc")))


def cli(smoke_run, *args: str):
    return runner.invoke(app, [*args, "--tracking-uri", smoke_run["tracking_uri"], "--root", str(smoke_run["root"])])


def pyfunc_embeddings(model, images=(), texts=()) -> tuple[np.ndarray, np.ndarray]:
    df = pd.DataFrame({"image": [encode_image_b64(p) for p in images] + [None] * len(texts),
                       "text": [None] * len(images) + list(texts)})
    out = model.predict(df)
    return (np.array(out["image_embedding"][: len(images)].tolist(), dtype=float),
            np.array(out["text_embedding"][len(images):].tolist(), dtype=float))


def test_predict_prints_a_probability_table_for_pngs_dicom_and_16bit_png(smoke_run, inputs, model_server):
    files = [*map(str, inputs["pngs"]), str(inputs["dicom"]), str(inputs["png16"]), str(inputs["bad"])]
    res = cli(smoke_run, "predict", *files, "--labels", ",".join(LABELS))
    assert res.exit_code == 0, res.output
    # the unreadable file is skipped, named, with curation's reason; the others are predicted
    assert f"skipped {inputs['bad']}: not an image" in res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split() == ["input", *LABELS] and len(lines) == 1 + 5
    for line, name in zip(lines[1:], files):
        cells = line.split()
        assert cells[0] == name and sum(c.endswith("*") for c in cells[1:]) == 1
        probs = [float(c.rstrip("*")) for c in cells[1:]]
        assert abs(sum(probs) - 1) < 0.003 and cells[1 + int(np.argmax(probs))].endswith("*")

    res = cli(smoke_run, "predict", *files[:5], "--labels", ",".join(LABELS), "--json", "--top-k", "2")
    out = json.loads(res.stdout)
    assert out["version"] == smoke_run["result"]["registration"]["champion_version"]
    for rec in out["predictions"]:
        p = np.array([rec["probabilities"][k] for k in LABELS])
        assert abs(p.sum() - 1) < 1e-9 and rec["prediction"] == LABELS[int(p.argmax())]
        assert [t["label"] for t in rec["top"]] == [LABELS[i] for i in np.argsort(-p)[:2]]
    # the DICOM and the 16-bit PNG hold one picture: read by curation's readers they are the same 8-bit image
    by_name = {r["input"]: r["probabilities"] for r in out["predictions"]}
    assert np.array_equal(read_image(inputs["dicom"]), read_image(inputs["png16"]))
    assert by_name[str(inputs["dicom"])] == pytest.approx(by_name[str(inputs["png16"])], abs=1e-6)


def test_embed_a_folder_and_captions_equals_the_registered_pyfunc(smoke_run, inputs, pyfunc, tmp_path):
    res = cli(smoke_run, "embed", str(inputs["folder"]), "--out", str(tmp_path / "img.npy"))
    assert res.exit_code == 0, res.output
    emb = np.load(tmp_path / "img.npy")
    index = json.loads((tmp_path / "img.index.json").read_text())
    # the folder, recursively and sorted; the caption sidecar is not an input
    expected = sorted([*inputs["pngs"], inputs["dicom"], inputs["png16"], inputs["nifti"]])
    assert index["inputs"] == [str(p) for p in expected] and index["kind"] == "image"
    assert emb.dtype == np.float32 and emb.shape == (len(expected), 128)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    ref, _ = pyfunc_embeddings(pyfunc, images=expected)  # DICOM and NIfTI bytes too, through the same readers
    assert np.allclose(emb, ref, atol=1e-5)

    captions = tmp_path / "captions.txt"
    captions.write_text("Chest radiograph showing a left pleural effusion.\n\nclear lungs\n")
    res = cli(smoke_run, "embed", "--texts", "a CT scan", f"@{captions}", "--out", str(tmp_path / "txt"))
    assert res.exit_code == 0, res.output
    emb = np.load(tmp_path / "txt.npy")
    texts = ["a CT scan", "Chest radiograph showing a left pleural effusion.", "clear lungs"]
    assert json.loads((tmp_path / "txt.index.json").read_text())["inputs"] == texts
    _, ref = pyfunc_embeddings(pyfunc, texts=texts)
    assert emb.shape == (3, 128) and np.allclose(emb, ref, atol=1e-5)


def test_unreadable_inputs_are_named_and_fail(inputs, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    bomb = tmp_path / "bomb.png"  # 30 Mpx of 16-bit: under curation's limit, over serving's (params.yaml)
    bomb.write_bytes(png16_bomb(6000, 5000))
    res = runner.invoke(app, ["predict", str(inputs["bad"]), str(empty), str(tmp_path / "missing.dcm"), str(bomb),
                              "--labels", "a,b"])
    assert res.exit_code == 1
    assert f"skipped {inputs['bad']}: not an image: content is no known image format" in res.stderr
    assert f"skipped {empty}: folder holds no image, DICOM or NIfTI file" in res.stderr
    assert f"skipped {tmp_path / 'missing.dcm'}: no such file or folder" in res.stderr
    assert (f"skipped {bomb}: too large: image 6000x5000 = 30000000 pixels > serving.max_pixels 25000000"
            in res.stderr)
    assert "none of the 4 input(s) could be read" in res.stderr
    # no tracking store anywhere: said so, rather than MLflow creating an empty one
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = runner.invoke(app, ["embed", str(inputs["pngs"][0]), "--out", str(tmp_path / "x.npy"),
                              "--root", str(tmp_path)])
    assert res.exit_code == 2 and f"no MLflow store at {tmp_path / 'mlflow_server' / 'mlflow.db'}" in res.stderr
    assert not (tmp_path / "mlflow_server").exists()


def post(url: str, rows: list) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image", "text"], "data": rows}}).encode()
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_embedding_requests(model_server, inputs, pyfunc):
    url = model_server.url()
    with urllib.request.urlopen(url + "/ping", timeout=10) as r:
        assert r.status == 200
    png, dicom = inputs["pngs"][0], inputs["dicom"]
    text = "Chest radiograph showing a left pleural effusion."
    status, out = post(url, [[encode_image_b64(png), text], [encode_image_b64(dicom), None], [None, "a CT scan"]])
    assert status == 200, out
    rows = out["predictions"]
    assert rows[1]["text_embedding"] is None and rows[2]["image_embedding"] is None
    served_img = np.array([rows[0]["image_embedding"], rows[1]["image_embedding"]])
    served_txt = np.array([rows[0]["text_embedding"], rows[2]["text_embedding"]])
    ref_img, ref_txt = pyfunc_embeddings(pyfunc, images=[png, dicom], texts=[text, "a CT scan"])
    assert np.allclose(served_img, ref_img, atol=1e-5) and np.allclose(served_txt, ref_txt, atol=1e-5)
    assert np.allclose(np.linalg.norm(np.vstack([served_img, served_txt]), axis=1), 1, atol=1e-5)
    # a payload that is no image: refused, the row named with curation's reason
    status, out = post(url, [[encode_image_b64(inputs["bad"]), None]])
    assert status == 400 and "row 0: not an image" in json.dumps(out)


def test_serving_limits_refuse_from_the_header_and_name_the_row(inputs, pyfunc, monkeypatch):
    # the registered model carries the limits it was registered with (params.yaml `serving`)
    assert pyfunc.model_config == ServingCfg().model_dump()
    limits = ServingCfg(max_image_bytes=300_000, max_rows=3)
    gate = DecodeGate(limits)
    decoded = []

    def decode(data, name):
        decoded.append(name)
        return decode_bytes(data, name=name, limits=limits)

    good = encode_image_b64(inputs["pngs"][0])
    big = b64(bytes(400_000))  # over max_image_bytes: refused from the base64 length, before it is decoded
    with pytest.raises(RequestError) as err:
        gate.images({0: good, 1: big, 2: b64(png16_bomb(6000, 5000))}, decode)
    assert err.value.status == 413 and not decoded  # every row is checked before any is decoded
    assert str(err.value).startswith("row 1: too large: about 400000 bytes of base64 payload > "
                                     "serving.max_image_bytes 300000 bytes")
    assert "; row 2: too large: image 6000x5000 = 30000000 pixels > serving.max_pixels" in str(err.value)
    with pytest.raises(RequestError, match=r"^row 0: too large: deflated DICOM dataset inflates to more than"):
        gate.images({0: b64(deflated_dicom_bomb(1000, 1000))}, decode)  # 2 MB inflated > 300 kB
    with pytest.raises(RequestError, match="too large: the request has 4 rows > serving.max_rows 3") as err:
        gate.check_rows(4)
    assert err.value.status == 413
    with pytest.raises(RequestError, match="^row 2: too large: text of 10001 characters > serving.max_text_chars"):
        gate.check_texts({0: "a CT scan", 2: "x" * 10_001})
    # past the scoring server's timeout (its client has had MLflow's 504), a request decodes nothing more
    with pytest.raises(RequestError, match="row 0: not decoded: the request passed the server's timeout") as err:
        gate.images({0: good}, decode, deadline=0.0)
    assert err.value.status == 504 and not decoded
    assert gate.images({0: good}, decode)[0].shape == read_image(inputs["pngs"][0]).shape and decoded == ["row 0"]
    # through the pyfunc: MLflow's error with the HTTP status, the rows named, no trace
    from mmkd.tracking.pyfunc import ServingRefusal

    with pytest.raises(ServingRefusal) as err:
        pyfunc.predict(pd.DataFrame({"image": [good, b64(png16_bomb(6000, 5000))], "text": [None, None]}))
    assert err.value.get_http_status_code() == 413 and err.value.message.startswith("row 1: too large")


def test_loading_a_registered_student_leaves_no_download_behind(smoke_run, tmp_path, monkeypatch):
    """MLflow downloads a model from a remote tracking server into a fresh temp folder it never removes (one model's
    worth of disk per load); mmkd's loaders download into their own and remove it once the weights are loaded."""
    import tempfile

    import open_clip

    import mmkd

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where both MLflow's and mmkd's temp folders go
    model = mmkd.load(DEFAULT_MODEL, tracking_uri=smoke_run["tracking_uri"])
    assert isinstance(model, open_clip.CLIP)
    assert list(tmp_path.iterdir()) == []
