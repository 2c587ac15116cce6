"""Code tests: the evaluation dataset catalog (catalog.yaml + embedded suite), its checks and `mmkd datasets list`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mmkd.config import MODALITIES
from mmkd.evaluation.catalog import (
    CATALOG_PATH,
    SPLIT_UNITS,
    CatalogError,
    embedded_entries,
    load_catalog,
    load_dataset,
    resolve,
    status,
)
from mmkd.evaluation.dataset import TASK_TYPES, DatasetMissing
from mmkd.evaluation.loaders import FORMATS
from tests.conftest import write_params


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_catalog_has_58_unique_entries_covering_modalities_tasks_formats(catalog):
    assert len(catalog) == 58
    assert len({e.name for e in catalog}) == 58
    assert {m for e in catalog for m in e.modalities} == set(MODALITIES)
    assert {t for e in catalog for t in e.tasks} == set(TASK_TYPES)
    assert {e.format for e in catalog} == set(FORMATS)
    for e in catalog:
        assert e.source.startswith("http") and e.licence and e.get and e.layout, e.name
        assert not e.embedded and not e.path.startswith("/"), e.name


def test_every_zero_shot_entry_has_two_prompts_per_class(catalog):
    zs = [e for e in catalog if "zeroshot" in e.tasks]
    assert len(zs) >= 30
    for e in zs:
        assert list(e.prompts) == e.classes or set(e.prompts) == set(e.classes), e.name
        assert all(len(set(e.prompts[c])) >= 2 for c in e.classes), e.name


def _write(tmp_path, entries):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"datasets": entries}, sort_keys=False))
    return path


def _raw(name="ok-set", **kw):
    base = dict(name=name, title="t", modalities=["xray"], tasks=["zeroshot"], format="medmnist_npz", path=name,
                options={"file": "x.npz"}, source="https://example.org", licence="CC0", get="download x.npz",
                layout="x.npz", splits=["test"], classes=["a", "b"],
                prompts={"a": ["an a", "image of a"], "b": ["a b", "image of b"]}, multilabel=False,
                metrics=["zeroshot_acc1"], split_by="single-split")
    return {**base, **kw}


@pytest.mark.parametrize("bad, words", [
    (dict(format="dicom_dump"), ["format"]),
    (dict(prompts={"a": ["only one"], "b": ["b1", "b2"]}), ["prompts.a", "2"]),
    (dict(options={"fiel": "x.npz"}), ["options.fiel", "options.file"]),
    (dict(tasks=["vqa"]), ["tasks", "vqa"]),
    (dict(modalities=["xray", "radar"]), ["modalities"]),
    (dict(metrics=["mil_auc"]), ["metrics", "mil_auc"]),
    (dict(split_by="by-chance"), ["split_by"]),
    (dict(split_by="patient"), ["split_by", "single-split"]),
    (dict(split_by="synthetic"), ["split_by", "embedded"]),
    (dict(facts=[{"fact": "CC0", "source": "the web"}]), ["facts.0.source"]),
    (dict(tasks=["zeroshot", "probe"], splits=["train", "test"], metrics=["zeroshot_acc1", "probe_acc1"],
          split_by="hashed-file"), ["split_by", "hashed-file"]),
])
def test_a_bad_entry_is_named_with_its_key(tmp_path, bad, words):
    path = _write(tmp_path, [_raw(), _raw("broken-set", **bad)])
    with pytest.raises(CatalogError) as exc:
        load_catalog(path)
    msg = str(exc.value)
    assert "'broken-set'" in msg and "'ok-set'" not in msg
    assert all(w in msg for w in words), msg


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="'twice'.*appears 2 times"):
        load_catalog(_write(tmp_path, [_raw("twice"), _raw("twice")]))


def test_status_of_a_missing_dataset_says_where_and_how_to_get_it(tmp_path, catalog):
    e = next(x for x in catalog if x.name == "oct2017")
    folder = resolve(e, tmp_path / "eval", tmp_path / "embedded")
    assert folder == tmp_path / "eval" / "oct2017"
    state, detail = status(e, folder)
    assert state == "missing" and str(folder) in detail and e.get in detail
    with pytest.raises(DatasetMissing, match="oct2017.*rscbjbr9sj|oct2017.*Mendeley"):
        load_dataset(e, folder)
    (folder / "CellData" / "OCT" / "train" / "CNV").mkdir(parents=True)
    state, detail = status(e, folder)
    assert state == "incomplete" and "CellData/OCT/test" in detail


def test_status_present_and_incomplete_without_loading(tmp_path, catalog):
    e = next(x for x in catalog if x.name == "pneumoniamnist")
    folder = tmp_path / "medmnist"
    folder.mkdir()
    np.savez(folder / "pneumoniamnist.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    state, detail = status(e, folder)
    assert state == "incomplete" and "train_labels" in detail
    _medmnist(folder / "pneumoniamnist.npz")
    assert status(e, folder)[0] == "present"
    ds = load_dataset(e, folder)
    assert ds.classes == ["normal", "pneumonia"] and len(ds.item_image) == 6


def _medmnist(path, n=2):
    arrays = {f"{s}_images": np.zeros((n, 4, 4), np.uint8) for s in ("train", "val", "test")}
    np.savez(path, **arrays, **{f"{s}_labels": np.array([[0], [1]] * (n // 2)) for s in ("train", "val", "test")})


def test_embedded_entries_follow_the_contract():
    from mmkd.data.synth import SPECS, zero_shot_prompts

    es = embedded_entries(survival_modalities=["mri"], mil_modalities=["ct", "pathology"])
    names = [e.name for e in es]
    assert names == [f"embedded-{m}" for m in MODALITIES] + ["embedded-vqa", "embedded-survival-mri",
                                                             "embedded-mil-ct", "embedded-mil-pathology"]
    by = {e.name: e for e in es}
    assert by["embedded-oct"].classes == list(SPECS["oct"].findings)
    assert by["embedded-oct"].prompts == zero_shot_prompts("oct") and by["embedded-oct"].path == "oct"
    assert by["embedded-oct"].tasks == ["zeroshot", "probe", "retrieval"] and by["embedded-oct"].format == "csv_manifest"
    assert by["embedded-vqa"].modalities == list(MODALITIES) and by["embedded-vqa"].path == "vqa"
    assert by["embedded-survival-mri"].path == "survival-mri" and by["embedded-survival-mri"].format == "survival_table"
    assert by["embedded-mil-ct"].classes == ["negative", "positive"] and by["embedded-mil-ct"].path == "mil-ct"
    assert resolve(by["embedded-mil-ct"], "/d", "/e").as_posix() == "/e/mil-ct"
    sub = embedded_entries(modalities=["ct", "xray"])
    assert [e.name for e in sub][:3] == ["embedded-xray", "embedded-ct", "embedded-vqa"]
    assert sub[2].modalities == ["xray", "ct"]
    assert [e.name for e in embedded_entries()][-4:] == ["embedded-survival-pathology", "embedded-survival-mri",
                                                         "embedded-mil-pathology", "embedded-mil-ct"]


def test_catalog_file_is_the_packaged_one():
    assert CATALOG_PATH.name == "catalog.yaml" and CATALOG_PATH.is_file()


def test_datasets_list_cli_shows_present_and_missing(tmp_path):
    from mmkd.cli import app

    write_params(tmp_path)
    (tmp_path / "data" / "eval" / "medmnist").mkdir(parents=True)
    _medmnist(tmp_path / "data" / "eval" / "medmnist" / "pneumoniamnist.npz")
    mil = tmp_path / "data" / "eval" / "embedded" / "mil-pathology"
    (mil / "patches" / "B0").mkdir(parents=True)
    (mil / "labels.csv").write_text("bag_id,label\nB0,positive\n")
    runner = CliRunner()
    out = runner.invoke(app, ["datasets", "list", "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    row = {ln.split()[0]: ln for ln in lines if ln and not ln.startswith(" ")}
    assert row["pneumoniamnist"].endswith("present") and row["embedded-mil-pathology"].endswith("present")
    assert row["chestx-ray14"].split()[-2] == "patient" and row["pathmnist"].split()[-2] == "image*"
    assert row["embedded-xray"].split()[-2] == "synthetic" and row["chexpert-5x200"].split()[-2] == "single-split"
    flagged = sum(e.split_flagged for e in load_catalog())
    assert f"* split not by patient ({flagged} datasets)" in out.output
    assert row["pathmnist"].endswith("missing") and row["embedded-xray"].endswith("missing")
    i = lines.index(row["pathmnist"])
    assert lines[i + 1].strip() == f"looked for {tmp_path / 'data' / 'eval' / 'medmnist' / 'pathmnist.npz'}"
    assert lines[i + 2].strip().startswith("get: download pathmnist.npz")
    assert "72 datasets: 2 present, 70 missing, 0 incomplete" in out.output

    js = json.loads(runner.invoke(app, ["datasets", "list", "--root", str(tmp_path), "--json"]).output)
    states = {d["name"]: d["status"] for d in js["datasets"]}
    assert states["pneumoniamnist"] == "present" and states["tcga-brca-survival"] == "missing" and len(states) == 72
    units = {d["name"]: (d["split_by"], d["patient_level_split"], d["split_flagged"]) for d in js["datasets"]}
    assert units["ham10000"] == ("lesion", False, True) and units["odir-5k"] == ("patient", True, False)

    verbose = runner.invoke(app, ["datasets", "list", "--root", str(tmp_path), "--verbose"]).output
    tcga = next(e for e in load_catalog() if e.name == "tcga-brca-survival")
    assert tcga.get in verbose and tcga.get not in out.output


def test_an_entry_without_split_by_is_refused(tmp_path):
    raw = _raw("no-unit")
    del raw["split_by"]
    with pytest.raises(CatalogError, match="'no-unit'.*split_by"):
        load_catalog(_write(tmp_path, [raw]))


def test_every_entry_says_how_it_is_split_and_non_patient_splits_are_flagged(catalog):
    by = {e.name: e for e in catalog}
    assert all(e.split_by in SPLIT_UNITS for e in catalog)
    assert {e.split_by for e in catalog} >= {"patient", "lesion", "study", "slide", "video", "image", "hashed-file",
                                            "single-split"}
    for name in ("chestx-ray14", "odir-5k", "pad-ufes-20", "figshare-brain-tumor", "tcga-brca-survival"):
        assert by[name].patient_level_split and not by[name].split_flagged, name
    for name in ("ham10000", "isic2019", "lits-slices", "pocus", "camelyon16", "kvasir-v2", "busi", "dermamnist"):
        assert not by[name].patient_level_split and by[name].split_flagged, name
    assert not by["chexpert-5x200"].split_flagged and not by["chexpert-5x200"].patient_level_split
    # the declared unit agrees with what the loader options do
    for e in catalog:
        grouped = e.split_by in ("patient", "lesion", "study", "video")
        if grouped and e.format == "csv_manifest" and not e.opts.split_col:
            assert e.opts.split_by, e.name
    assert all(e.patient_level_split and not e.split_flagged for e in embedded_entries())


def _facts(e):
    return " ".join(f.fact for f in e.facts), [f.source for f in e.facts]


def test_catalog_facts_of_issue_18_with_their_sources(catalog):
    by = {e.name: e for e in catalog}
    medmnist = [e for e in catalog if e.format == "medmnist_npz"]
    assert [e.name for e in medmnist if "NC" in e.licence] == ["dermamnist"]
    assert by["dermamnist"].licence.startswith("CC BY-NC 4.0")
    assert all(e.licence == "CC BY 4.0" for e in medmnist if e.name != "dermamnist")
    text, src = _facts(by["dermamnist"])
    assert "v2.2.3" in text and src == ["https://github.com/MedMNIST/MedMNIST"]

    oct_ = by["oct2017"]
    assert oct_.source.endswith("rscbjbr9sj/3") and "ZhangLabData.zip" in oct_.get and '"OCT2017 "' in oct_.get
    assert oct_.opts.split_dirs == {"train": "CellData/OCT/train", "test": "CellData/OCT/test"}
    assert oct_.layout.startswith("oct2017/CellData/OCT/{train,test}")

    pv = by["pathvqa"].licence
    assert "code" in pv and "publishers" in pv and "PEIR" in pv
    text, src = _facts(by["chexpert-5x200"])
    get = by["chexpert-5x200"].get
    assert "negative or blank" in get and "images, not studies" in get and "without a seed" in get
    assert "no random_state" in text and src[0].startswith("https://github.com/marshuang80/gloria/")

    cam = by["camelyon16"]
    assert "399" in cam.get and "testing/reference.csv" in cam.get and "split = train" in cam.get
    assert any("399" in f.fact for f in cam.facts) and any("reference.csv" in f.fact for f in cam.facts)

    rsna = by["rsna-pneumonia"]
    assert rsna.source.startswith("https://www.rsna.org/") and "attribution" in rsna.licence
    assert "Kaggle competition rules" not in rsna.licence

    isic = by["isic2019"]
    assert isic.opts.split_by == "lesion_id" and isic.opts.manifest == "manifest.csv" and isic.split_by == "lesion"
    busi = by["busi"]
    assert busi.format == "csv_manifest" and busi.opts.split_by == "group" and "19%" in busi.get
    assert any("235" in f.fact for f in busi.facts)
    for name in ("oct2017", "dermamnist", "pathvqa", "chexpert-5x200", "camelyon16", "rsna-pneumonia", "isic2019",
                 "busi"):
        assert by[name].facts and all(f.source.startswith("https://") for f in by[name].facts), name


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4)).save(path)


def test_oct2017_loads_from_the_version_3_layout(tmp_path, catalog):
    e = next(x for x in catalog if x.name == "oct2017")
    folder = tmp_path / "oct2017"
    for split in ("train", "test"):
        for d in ("CNV", "DME", "DRUSEN", "NORMAL"):
            _png(folder / "CellData" / "OCT" / split / d / f"{d}-1-{split}.jpeg")
    assert status(e, folder)[0] == "present"
    ds = load_dataset(e, folder)
    assert sorted(ds.item_split.tolist()) == ["test"] * 4 + ["train"] * 4
    assert sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_busi_duplicates_and_isic_lesions_stay_in_one_split(tmp_path, catalog):
    by = {e.name: e for e in catalog}
    busi = tmp_path / "busi"
    rows = ["image,label,group"]
    for k in range(40):  # 40 groups of two duplicates each
        for copy in range(2):
            img = f"Dataset_BUSI_with_GT/benign/benign ({k}-{copy}).png"
            _png(busi / img)
            rows.append(f"{img},benign,g{k}")
    _png(busi / "Dataset_BUSI_with_GT/malignant/malignant (1).png")
    rows.append("Dataset_BUSI_with_GT/malignant/malignant (1).png,malignant,malignant (1).png")
    (busi / "manifest.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(by["busi"], busi)
    pairs = ds.item_split[:80].reshape(40, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all() and len(set(ds.item_split.tolist())) > 1

    isic = tmp_path / "isic2019"
    rows = ["image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,lesion_id"]
    for k in range(60):
        _png(isic / "ISIC_2019_Training_Input" / f"ISIC_{k:07d}.jpg")
        rows.append(f"ISIC_{k:07d},1,0,0,0,0,0,0,0,IL_{k // 3:07d}")
    (isic / "manifest.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(by["isic2019"], isic)
    triples = ds.item_split.reshape(20, 3)
    assert (triples == triples[:, :1]).all() and len(set(ds.item_split.tolist())) > 1
