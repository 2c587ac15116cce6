"""Code tests: each evaluation-dataset loader on tiny files in its real on-disk format (built here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmkd.evaluation.catalog import CatalogEntry, default_metrics
from mmkd.evaluation.dataset import DatasetFormatError, FileImages
from mmkd.evaluation.loaders import LOADERS
from mmkd.evaluation.loaders.common import hash_split


def entry(fmt: str, classes=(), tasks=None, multilabel=False, options=None, **kw) -> CatalogEntry:
    tasks = tasks or {"vqa_json": ["vqa"], "survival_table": ["survival"], "mil_bags": ["mil"]}.get(fmt, ["probe"])
    return CatalogEntry(name="t", title="test set", modalities=kw.pop("modalities", ["xray"]), tasks=tasks,
                        format=fmt, path="t", options=options or {}, source="https://example.org", licence="CC0",
                        get="make it", layout="see test", splits=kw.pop("splits", ["train", "val", "test"]),
                        classes=list(classes), multilabel=multilabel,
                        prompts={c: [f"a {c}", f"an image of {c}"] for c in classes} if "zeroshot" in tasks else {},
                        metrics=default_metrics(tasks, multilabel), **kw)


def load(e: CatalogEntry, folder):
    return LOADERS[e.format](folder, e)


def png(path, value=0, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value, value)).save(path)
    return path


# ------------------------------------------------------------------ medmnist_npz
def test_medmnist_multiclass_keeps_split_order_and_rejects_bad_labels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8) for s, n in
              (("train", 4), ("val", 2), ("test", 3))}
    arrays |= {"train_labels": np.array([[0], [1], [2], [7]]), "val_labels": np.array([[1], [0]]),
               "test_labels": np.array([[2], [2], [0]])}
    np.savez(tmp_path / "tiny.npz", **arrays)
    ds = load(entry("medmnist_npz", ["a", "b", "c"], options={"file": "tiny.npz"}), tmp_path)
    assert ds.item_split.tolist() == ["train"] * 3 + ["val"] * 2 + ["test"] * 3
    assert ds.labels.tolist() == [0, 1, 2, 1, 0, 2, 2, 0]
    assert ds.item_image.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]  # row 3 (label 7) is skipped, not renumbered
    assert ds.rejected == [("tiny.npz train_labels[3]", "label 7 not valid for 3 classes")]
    im = ds.images.load(int(ds.item_image[-1]))
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), arrays["test_images"][2])


def test_medmnist_multilabel_grey(tmp_path):
    x = np.zeros((3, 8, 8), np.uint8)
    y = np.array([[1, 0, 1], [0, 0, 0], [2, 0, 1]])
    np.savez(tmp_path / "chest.npz", **{f"{s}_images": x for s in ("train", "val", "test")},
             **{f"{s}_labels": y for s in ("train", "val", "test")})
    ds = load(entry("medmnist_npz", ["p", "q", "r"], multilabel=True, options={"file": "chest.npz"}), tmp_path)
    assert ds.multilabel and ds.labels.shape == (6, 3) and ds.labels[0].tolist() == [1, 0, 1]
    assert [r[0] for r in ds.rejected] == [f"chest.npz {s}_labels[2]" for s in ("train", "val", "test")]
    assert ds.images.load(0).mode == "RGB"


def test_medmnist_missing_key_names_file_and_key(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((1, 4, 4), np.uint8), train_labels=np.zeros((1, 1)))
    with pytest.raises(DatasetFormatError, match=r"bad\.npz.*val_images"):
        load(entry("medmnist_npz", ["a", "b"], options={"file": "bad.npz"}), tmp_path)


# ------------------------------------------------------------------ image_folder
def test_image_folder_with_split_dirs_and_class_dirs(tmp_path):
    for split, n in (("Training", 2), ("Testing", 1)):
        for cls in ("glioma", "notumor"):
            for i in range(n):
                png(tmp_path / split / cls / f"{i}.jpg", 10 * i)
    png(tmp_path / "Training" / "glioma" / "0_mask.png")
    (tmp_path / "Training" / "glioma" / "notes.txt").write_text("not an image")
    e = entry("image_folder", ["glioma", "no tumor"], splits=["train", "test"],
              options={"split_dirs": {"train": "Training", "test": "Testing"}, "class_dirs": {"no tumor": "notumor"},
                       "exclude": ["*_mask*"]})
    ds = load(e, tmp_path)
    names = [str(p.relative_to(tmp_path)) for p in ds.images.paths]
    assert names == ["Training/glioma/0.jpg", "Training/glioma/1.jpg", "Training/notumor/0.jpg",
                     "Training/notumor/1.jpg", "Testing/glioma/0.jpg", "Testing/notumor/0.jpg"]
    assert ds.item_split.tolist() == ["train"] * 4 + ["test"] * 2 and ds.labels.tolist() == [0, 0, 1, 1, 0, 1]
    assert ds.rejected == []


def test_image_folder_without_split_dirs_hashes_paths(tmp_path):
    for cls in ("benign", "malignant"):
        for i in range(20):
            png(tmp_path / "set" / cls / f"{cls} ({i}).png")
    e = entry("image_folder", ["benign", "malignant", "normal"],
              options={"class_dirs": {c: f"set/{c}" for c in ("benign", "malignant", "normal")}})
    ds = load(e, tmp_path)
    assert len(ds.item_image) == 40 and set(ds.item_split) <= {"train", "val", "test"}
    expect = [hash_split(str(p.relative_to(tmp_path)), {"train": 0.7, "val": 0.1, "test": 0.2}) for p in ds.images.paths]
    assert ds.item_split.tolist() == expect and len(set(expect)) > 1
    assert load(e, tmp_path).item_split.tolist() == expect  # deterministic
    assert ds.rejected == [("set/normal", "class 'normal': folder missing or without images")]


# ------------------------------------------------------------------ csv_manifest
def test_csv_manifest_rejects_bad_rows_by_row(tmp_path):
    for n in ("a.png", "b.png", "c.png", "e.png"):
        png(tmp_path / "img" / n)
    (tmp_path / "manifest.csv").write_text(
        "image,label,split,caption\n"
        "img/a.png,normal,train,a normal chest\n"
        "img/b.png,tumour,test,a tumour\n"          # unknown class
        "img/missing.png,normal,test,lost\n"        # image file not found
        "img/c.png,normal,holdout,c\n"              # bad split
        "img/e.png,effusion,valid,an effusion\n"    # split_map valid -> val
        "img/a.png,normal,test,\n")                 # empty caption (retrieval)
    e = entry("csv_manifest", ["normal", "effusion"], tasks=["zeroshot", "probe", "retrieval"],
              options={"split_map": {"valid": "val"}})
    ds = load(e, tmp_path)
    assert ds.labels.tolist() == [0, 1] and ds.item_split.tolist() == ["train", "val"]
    assert ds.captions == ["a normal chest", "an effusion"]
    assert ds.rejected == [("manifest.csv row 3 (img/b.png)", "unknown class 'tumour'"),
                           ("manifest.csv row 4 (img/missing.png)", "image file not found: img/missing.png"),
                           ("manifest.csv row 5 (img/c.png)", "bad split 'holdout' (train|val|test or split_map)"),
                           ("manifest.csv row 7 (img/a.png)", "empty caption")]


def test_csv_manifest_missing_column_names_file_and_column(tmp_path):
    (tmp_path / "manifest.csv").write_text("image,label\nx.png,a\n")
    with pytest.raises(DatasetFormatError, match=r"manifest\.csv: missing column\(s\) \['split'\]"):
        load(entry("csv_manifest", ["a", "b"]), tmp_path)


def test_csv_manifest_multilabel_official_layout(tmp_path):
    """ChestX-ray14's own CSV: '|'-joined findings, 'No Finding', image ids under images/, patient-hashed splits."""
    for n in ("1.png", "2.png", "3.png"):
        png(tmp_path / "images" / n)
    (tmp_path / "entries.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n1.png,Effusion|Mass,7\n2.png,No Finding,7\n3.png,Hernia,8\n")
    e = entry("csv_manifest", ["effusion", "mass"], multilabel=True,
              options={"manifest": "entries.csv", "image_col": "Image Index", "image_pattern": "images/{}",
                       "label_col": "Finding Labels", "label_sep": "|", "split_col": None, "split_by": "Patient ID",
                       "label_map": {"No Finding": None, "Effusion": "effusion", "Mass": "mass"}})
    ds = load(e, tmp_path)
    assert ds.labels.tolist() == [[1, 1], [0, 0]] and ds.item_split[0] == ds.item_split[1] == hash_split("7", {
        "train": 0.7, "val": 0.1, "test": 0.2})
    assert ds.rejected == [("entries.csv row 4 (3.png)", "unknown class 'Hernia'")]


def test_csv_manifest_one_hot_columns(tmp_path):
    for n in ("x", "y", "z"):
        png(tmp_path / "in" / f"{n}.jpg")
    (tmp_path / "gt.csv").write_text("image,MEL,NV,UNK\nx,1.0,0.0,0.0\ny,0.0,1.0,0.0\nz,1.0,1.0,0.0\n")
    e = entry("csv_manifest", ["melanoma", "nevus"],
              options={"manifest": "gt.csv", "image_pattern": "in/{}.jpg", "label_col": None,
                       "label_cols": ["MEL", "NV"], "split_col": None})
    ds = load(e, tmp_path)
    assert ds.labels.tolist() == [0, 1] and ds.captions is None
    assert ds.rejected == [("gt.csv row 4 (z)", "2 positive label columns (exactly one expected)")]


# ------------------------------------------------------------------ vqa_json
def _q(img, q, a, atype="CLOSED", lang="en", ctype="Abnormality", **kw):
    return {"img_name": img, "question": q, "answer": a, "answer_type": atype, "content_type": ctype,
            "q_lang": lang, **kw}


def test_vqa_slake_keeps_closed_english_questions(tmp_path):
    png(tmp_path / "imgs" / "xmlab1" / "source.jpg")
    png(tmp_path / "imgs" / "xmlab2" / "source.jpg")
    (tmp_path / "train.json").write_text(json.dumps([
        _q("xmlab1/source.jpg", "Is the lung healthy?", " Yes ", qid=1),
        _q("xmlab1/source.jpg", "What organ is shown?", "Lung", atype="OPEN", ctype="Organ"),
        _q("xmlab1/source.jpg", "肺部健康吗?", "是", lang="zh"),
        _q("xmlab9/source.jpg", "Is there a mass?", "No", qid=4)]))
    (tmp_path / "validation.json").write_text(json.dumps([_q("xmlab2/source.jpg", "Is this an MRI?", "NO")]))
    (tmp_path / "test.json").write_text(json.dumps([_q("xmlab2/source.jpg", "Does it show a tumour?", "yes",
                                                       ctype="Position"), {"question": "no image"}]))
    ds = load(entry("vqa_json", modalities=["ct", "mri"]), tmp_path)
    assert ds.questions == ["Is the lung healthy?", "Is this an MRI?", "Does it show a tumour?"]
    assert ds.answers == ["yes", "no", "yes"] and ds.question_types == ["Abnormality", "Abnormality", "Position"]
    assert ds.item_split.tolist() == ["train", "val", "test"] and ds.item_image.tolist() == [0, 1, 1]
    assert ds.modality == "multi"
    assert ("train.json #3 (qid 4)", "image file not found: imgs/xmlab9/source.jpg") in ds.rejected
    assert ("train.json: 1 questions", "open-ended: not evaluated (closed-ended questions only)") in ds.rejected
    assert ("train.json: 1 questions", "not English: not evaluated") in ds.rejected
    assert any(r[0] == "test.json #1" and "missing field" in r[1] for r in ds.rejected)


def test_vqa_rad_single_file_splits_by_phrase_type(tmp_path):
    png(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg")
    rec = dict(image_name="synpic1.jpg", question_type="PRES", image_organ="CHEST")
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps([
        {**rec, "question": "Is there an effusion?", "answer": "Yes", "answer_type": "CLOSED",
         "phrase_type": "freeform"},
        {**rec, "question": "How many nodules?", "answer": 2, "answer_type": "CLOSED ", "phrase_type": "test_para",
         "question_type": "COUNT"},
        {**rec, "question": "Where is the mass?", "answer": "left", "answer_type": "OPEN", "phrase_type": "para"}]))
    ds = load(entry("vqa_json", options={"layout": "vqa_rad"}, splits=["train", "test"]), tmp_path)
    assert ds.answers == ["yes", "2"] and ds.item_split.tolist() == ["train", "test"]
    assert ds.question_types == ["PRES", "COUNT"]
    assert ds.rejected == [("VQA_RAD Dataset Public.json: 1 questions",
                            "open-ended: not evaluated (closed-ended questions only)")]


def test_vqa_json_not_a_list_is_a_format_error(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(DatasetFormatError, match=r"train\.json: expected a JSON list"):
        load(entry("vqa_json"), tmp_path)


# ------------------------------------------------------------------ survival_table
def test_survival_patches_dirs_and_bad_records(tmp_path):
    for pid, n in (("P1", 2), ("P2", 1), ("P3", 1), ("P5", 1)):
        for j in range(n):
            png(tmp_path / "patches" / pid / f"{j:02d}.png")
    (tmp_path / "clinical.csv").write_text(
        "patient_id,time,event\nP1,100.5,1\nP2,30,0\nP3,abc,1\nP4,50,1\nP5,20,2\nP1,7,0\n")
    ds = load(entry("survival_table", modalities=["pathology"], splits=[]), tmp_path)
    assert ds.bag_ids == ["P1", "P2"] and ds.time.tolist() == [100.5, 30.0] and ds.event.tolist() == [1, 0]
    assert [[ds.images.paths[i].name for i in b] for b in ds.bags] == [["00.png", "01.png"], ["00.png"]]
    assert ds.bag_split is None and ds.modality == "pathology"
    assert ds.rejected == [("clinical.csv row 4 (P3)", "non-numeric or negative time 'abc'"),
                           ("clinical.csv row 6 (P5)", "event '2' not 0/1"),
                           ("clinical.csv row 7 (P1)", "duplicate patient id"),
                           ("patient P4", "empty bag: no images in patches/P4/ or bags.csv")]


def test_survival_bags_csv_and_tcga_columns(tmp_path):
    for n in ("a.png", "b.png", "c.png"):
        png(tmp_path / "tiles" / n)
    (tmp_path / "bags.csv").write_text("patient_id,image\nTCGA-1,tiles/a.png\nTCGA-2,tiles/b.png\n"
                                       "TCGA-2,tiles/gone.png\nTCGA-3,tiles/c.png\n")
    (tmp_path / "clinical.tsv").write_text(
        "case_submitter_id\tvital_status\tdays_to_death\tdays_to_last_follow_up\ttreatment\n"
        "TCGA-1\tDead\t400\t'--\tA\nTCGA-1\tDead\t400\t'--\tB\n"
        "TCGA-2\tAlive\t'--\t1200\tA\nTCGA-3\tAlive\t'--\t'--\tA\n")
    e = entry("survival_table", splits=[], options={"file": "clinical.tsv", "sep": "\t", "tcga": True})
    ds = load(e, tmp_path)
    assert ds.bag_ids == ["TCGA-1", "TCGA-2"] and ds.time.tolist() == [400, 1200] and ds.event.tolist() == [1, 0]
    assert ("bags.csv row 4 (tiles/gone.png)", "image file not found") in ds.rejected
    assert ("clinical.tsv case TCGA-3", "non-numeric time: days_to_last_follow_up = ''--'") in ds.rejected


def test_survival_missing_column_names_file(tmp_path):
    (tmp_path / "clinical.csv").write_text("patient_id,days\nP1,3\n")
    with pytest.raises(DatasetFormatError, match=r"clinical\.csv: missing column\(s\) \['time', 'event'\]"):
        load(entry("survival_table", splits=[]), tmp_path)


# ------------------------------------------------------------------ mil_bags
def test_mil_bags_of_patches(tmp_path):
    for bid, n in (("B1", 2), ("B2", 1), ("B3", 1)):
        for j in range(n):
            png(tmp_path / "patches" / bid / f"{j}.png")
    (tmp_path / "labels.csv").write_text("bag_id,label,split\nB1,positive,train\nB2,negative,test\n"
                                         "B3,unsure,test\nB4,negative,train\nB2,positive,test\n")
    ds = load(entry("mil_bags", ["negative", "positive"], splits=[]), tmp_path)
    assert ds.bag_ids == ["B1", "B2"] and ds.labels.tolist() == [1, 0] and ds.bag_split.tolist() == ["train", "test"]
    assert [len(b) for b in ds.bags] == [2, 1] and ds.bag_features is None
    assert ds.rejected == [("labels.csv row 4 (B3)", "label 'unsure': unknown class"),
                           ("labels.csv row 6 (B2)", "duplicate bag id"),
                           ("bag B4", "empty bag: no images in patches/B4/ or bags.csv")]


def test_mil_bags_of_pt_features(tmp_path):
    import torch

    (tmp_path / "features").mkdir()
    torch.save(torch.randn(5, 4), tmp_path / "features" / "s1.pt")
    np.save(tmp_path / "features" / "s2.npy", np.ones((3, 4), np.float32))
    torch.save(torch.randn(4), tmp_path / "features" / "s3.pt")  # 1-D: not patches x dim
    torch.save({"feats": torch.randn(2, 4)}, tmp_path / "features" / "s4.pt")
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,LUAD\ns2,LUSC\ns3,LUAD\ns4,LUSC\ns5,LUAD\n")
    e = entry("mil_bags", ["adenocarcinoma", "squamous"], splits=[],
              options={"id_col": "slide_id", "feature_encoder": "uni-v1",
                       "label_map": {"LUAD": "adenocarcinoma", "LUSC": "squamous"}})
    ds = load(e, tmp_path)
    assert ds.bag_ids == ["s1", "s2"] and ds.labels.tolist() == [0, 1] and ds.bags is None
    assert [f.shape for f in ds.bag_features] == [(5, 4), (3, 4)] and ds.bag_features[0].dtype == np.float32
    assert ds.feature_encoder == "uni-v1"
    reasons = dict(ds.rejected)
    assert "expected (n_patches>0, dim)" in reasons["bag s3"] and "not a tensor" in reasons["bag s4"]
    assert reasons["bag s5"] == "empty bag: no features/s5.pt or .npy"


# ------------------------------------------------------------------ images
def test_16bit_png_reads_as_rgb_uint8(tmp_path):
    a = np.linspace(0, 4000, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "ct16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(FileImages([path]).load(0))
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 3) and arr.min() == 0 and arr.max() == 255
