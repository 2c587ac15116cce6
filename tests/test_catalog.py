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
                metrics=["zeroshot_acc1"])
    return {**base, **kw}


@pytest.mark.parametrize("bad, words", [
    (dict(format="dicom_dump"), ["format"]),
    (dict(prompts={"a": ["only one"], "b": ["b1", "b2"]}), ["prompts.a", "2"]),
    (dict(options={"fiel": "x.npz"}), ["options.fiel", "options.file"]),
    (dict(tasks=["vqa"]), ["tasks", "vqa"]),
    (dict(modalities=["xray", "radar"]), ["modalities"]),
    (dict(metrics=["mil_auc"]), ["metrics", "mil_auc"]),
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
    (folder / "OCT2017" / "train" / "CNV").mkdir(parents=True)
    state, detail = status(e, folder)
    assert state == "incomplete" and "OCT2017/test" in detail


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
    assert row["pathmnist"].endswith("missing") and row["embedded-xray"].endswith("missing")
    i = lines.index(row["pathmnist"])
    assert lines[i + 1].strip() == f"looked for {tmp_path / 'data' / 'eval' / 'medmnist' / 'pathmnist.npz'}"
    assert lines[i + 2].strip().startswith("get: download pathmnist.npz")
    assert "72 datasets: 2 present, 70 missing, 0 incomplete" in out.output

    js = json.loads(runner.invoke(app, ["datasets", "list", "--root", str(tmp_path), "--json"]).output)
    states = {d["name"]: d["status"] for d in js["datasets"]}
    assert states["pneumoniamnist"] == "present" and states["tcga-brca-survival"] == "missing" and len(states) == 72

    verbose = runner.invoke(app, ["datasets", "list", "--root", str(tmp_path), "--verbose"]).output
    tcga = next(e for e in load_catalog() if e.name == "tcga-brca-survival")
    assert tcga.get in verbose and tcga.get not in out.output
