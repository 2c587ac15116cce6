"""Data tests: curation as the front door - bad input of every kind, sources, splits, incremental runs, the store."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.config import CurateCfg, SourceCfg, SynthCfg
from mmkd.data.clean import resolve_modality, scrub
from mmkd.data.curate import curate
from mmkd.data.manifest import read_manifest, write_jsonl
from mmkd.data.report import curation_report
from mmkd.data.store import CurationError, load_curated
from mmkd.data.synth import generate


def _cfg(**kw) -> CurateCfg:
    return CurateCfg(workers=0, **kw)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """A small embedded corpus (2 modalities, 14 records each) under tmp/data."""
    generate(SynthCfg(image_size=48, modalities=["xray", "pathology"], train_per_modality=6, probe_per_modality=4,
                      test_per_modality=4, workers=1), 0, tmp_path / "data")
    return tmp_path / "data"


def _png(arr: np.ndarray, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def test_bad_input_corpus_is_quarantined_or_repaired_and_every_good_record_survives(corpus, tmp_path):
    good = read_manifest(corpus / "manifest.jsonl")
    img = corpus / "images" / "bad"
    img.mkdir()
    first = corpus / good[0]["image"]
    data = first.read_bytes()
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    (img / "zero.png").write_bytes(b"")
    (img / "text.png").write_text("this is not an image\n")
    Image.new("1", (12_000, 12_000)).save(img / "bomb.png")                 # 144 M pixels declared, tiny file
    ramp = (np.linspace(0, 4000, 48 * 48).reshape(48, 48)).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(ramp).save(img / "deep16.png")
    checker = ((np.arange(48)[:, None] // 8 + np.arange(48) // 8) % 2 * 24 - 12)[..., None]  # +-12: not one flat colour
    Image.fromarray((np.array([200, 30, 90]) + checker).astype(np.uint8)).convert("CMYK").save(img / "cmyk.jpg",
                                                                                                 quality=95)
    shutil.copy(first, img / "exact-copy.png")
    Image.open(corpus / good[1]["image"]).convert("RGB").save(img / "reencoded.jpg", quality=90)
    _png(np.full((8, 8, 3), 128, np.uint8), img / "tiny.png")
    _png(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8), tmp_path / "outside.png")
    fresh = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(4)]
    for i, arr in enumerate(fresh):
        _png(arr, img / f"fresh{i}.png")
    base = {"modality": "xray", "split": "train", "labels": {"finding": "normal"}}

    def line(rid, image, caption="a frontal chest X-ray", **kw):
        return json.dumps({**base, "id": rid, "image": image, "caption": caption, **kw})

    bad = {  # id -> (manifest line, expected quarantine category)
        "truncated": (line("truncated", "images/bad/truncated.png"), "truncated or corrupt PNG data"),
        "zero": (line("zero", "images/bad/zero.png"), "empty file"),
        "text": (line("text", "images/bad/text.png"), "not an image"),
        "bomb": (line("bomb", "images/bad/bomb.png"), "decompression bomb"),
        "empty-caption": (line("empty-caption", "images/bad/fresh0.png", caption="  \t "), "empty caption"),
        "exact": (line("exact", "images/bad/exact-copy.png"), "exact duplicate"),
        "near": (line("near", "images/bad/reencoded.jpg"), "near duplicate"),
        "missing": (line("missing", "images/bad/nowhere.png"), "image file not found"),
        "escape": (line("escape", "../outside.png"), "path escapes the source root"),
        "tiny": (line("tiny", "images/bad/tiny.png"), "image too small"),
        "dup-id": (line(good[2]["id"], "images/bad/fresh1.png"), "duplicate id"),
        "bad-split": (line("bad-split", "images/bad/fresh1.png", split="validation"), "unknown split 'validation'"),
        "malformed": ('{"id": "malformed", "image": ', "invalid JSON"),
    }
    repaired = {
        "deep16": line("deep16", "images/bad/deep16.png"),
        "cmyk": line("cmyk", "images/bad/cmyk.jpg"),
        "identifiers": line("identifiers", "images/bad/fresh2.png",
                            caption="Chest X-ray of Mr. John Smith, MRN 12345678, taken 03/14/2021; call 555-123-4567"),
        "pet-ct": line("pet-ct", "images/bad/fresh3.png", caption="axial CT of the abdomen", modality="PET"),
        "pet-unknown": line("pet-unknown", "images/bad/fresh1.png", caption="an image of something", modality="PET"),
    }
    with open(corpus / "manifest.jsonl", "ab") as fh:
        for text, _ in bad.values():
            fh.write(text.encode() + b"\n")
        fh.write(b'{"id": "latin1", "image": "images/bad/fresh0.png", "caption": "caf\xe9 x-ray"}\n')  # invalid UTF-8
        for text in repaired.values():
            fh.write(text.encode() + b"\n")

    summary = curate(corpus, tmp_path / "curated", _cfg(max_pixels=50_000_000))
    assert summary["kept"] == len(good) + len(repaired)             # every good and repairable record survives
    assert summary["quarantined"] == len(bad) + 1
    q = {r["id"] or f"line{r['line']}": r for r in read_manifest(tmp_path / "curated" / "quarantine.jsonl")}
    malformed = q["malformed"] = q[f"line{len(good) + len(bad)}"]       # no id: it never parsed
    assert malformed["record"] == bad["malformed"][0] and malformed["line"] == len(good) + len(bad)
    for rid, (_, category) in bad.items():
        key = good[2]["id"] if rid == "dup-id" else rid
        assert q[key]["reason"].startswith(category), (rid, q[key]["reason"])
        assert q[key]["source"] == "embedded" and q[key]["record"] is not None
    assert q["exact"]["reason"] == f"exact duplicate of '{good[0]['id']}' (same decoded pixels)"
    assert f"near duplicate of '{good[1]['id']}'" in q["near"]["reason"]
    latin = next(r for r in q.values() if r["reason"].startswith("invalid UTF-8"))
    assert "caf\\xe9" in latin["record"]                              # the raw line is kept, escaped
    kept = {r["id"]: r for r in read_manifest(tmp_path / "curated" / "manifest.jsonl")}
    records, images = load_curated(tmp_path / "curated", "train")
    pix = dict(zip([r["id"] for r in records], images[np.arange(len(records))]))
    deep = pix["deep16"][..., 0]
    assert deep.min() == 0 and deep.max() == 255 and (deep == 255).mean() < 0.05   # windowed, not clipped
    assert np.abs(pix["cmyk"].reshape(-1, 3).mean(0) - (200, 30, 90)).max() < 12
    cap = kept["identifiers"]["caption"]
    assert "John" not in cap and "12345678" not in cap and "2021" not in cap and "555" not in cap
    assert kept["identifiers"]["scrubbed"] == {"name": 1, "record_number": 1, "date": 1, "phone": 1}
    assert (kept["pet-ct"]["modality"], kept["pet-ct"]["modality_from"]) == ("ct", "caption")
    assert kept["pet-unknown"]["modality"] == "unknown" and summary["unknown_modality"] == 1
    report = curation_report(tmp_path / "curated")
    assert "near duplicate" in report and "embedded kept" in report


def test_curation_with_nothing_usable_fails_clearly(tmp_path):
    write_jsonl(tmp_path / "data" / "manifest.jsonl",
                [{"id": "a", "image": "x.png", "caption": "c", "modality": "ct", "split": "train"}])
    with pytest.raises(CurationError, match="no usable records"):
        curate(tmp_path / "data", tmp_path / "out", _cfg())


def test_parallel_workers_give_the_same_store_as_one_process(corpus, tmp_path):
    curate(corpus, tmp_path / "a", _cfg())
    curate(corpus, tmp_path / "b", CurateCfg(workers=2))
    for rel in ("manifest.jsonl", "shards/train-00000.tar", "decoded/224/test-00000.npy"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_incremental_run_decodes_only_new_records_and_keeps_shards(corpus, tmp_path):
    out = tmp_path / "curated"
    first = curate(corpus, out, _cfg())
    before = {p.name: _md5(p) for p in (out / "shards").glob("*.tar")}
    new = corpus / "images" / "new"
    lines = []
    for i in range(3):
        _png(np.random.default_rng(100 + i).integers(0, 255, (48, 48, 3), dtype=np.uint8), new / f"n{i}.png")
        lines.append({"id": f"new-{i}", "image": f"images/new/n{i}.png", "caption": "a new chest x-ray",
                      "modality": "xray", "split": "train"})
    with open(corpus / "manifest.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in lines)
    second = curate(corpus, out, _cfg())
    assert second["decoded"] == 3 and second["reused"] == first["kept"]
    assert second["kept"] == first["kept"] + 3
    assert {p.name: _md5(p) for p in (out / "shards").glob("*.tar") if p.name in before} == before
    assert (out / "shards" / "train-00001.tar").exists()            # new records went to a new shard
    records, images = load_curated(out, "train")
    assert len(records) == len(images) == first["kept_per_split"]["train"] + 3
    # a record removed from the source: everything is curated again, consistently
    kept = (corpus / "manifest.jsonl").read_text().splitlines()[1:]
    (corpus / "manifest.jsonl").write_text("\n".join(kept) + "\n")
    third = curate(corpus, out, _cfg())
    assert third["decoded"] == third["input_records"] and third["kept"] == second["kept"] - 1
    assert len(load_curated(out, "train")[1]) == third["kept_per_split"]["train"]


def test_groups_never_straddle_splits(tmp_path):
    root = tmp_path / "data"
    rows = []
    for i in range(40):
        _png(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8), root / f"im{i}.png")
        rows.append({"id": f"r{i}", "image": f"im{i}.png", "caption": "an axial CT slice", "group": f"patient{i // 4}"})
    rows[1]["split"] = "test" if rows[0].get("split") != "test" else "train"  # a declared split against its group
    write_jsonl(root / "pairs.jsonl", rows)
    cfg = _cfg(sources=[SourceCfg(name="ct", kind="manifest", path="pairs.jsonl")],
               split_fractions={"train": 0.5, "probe": 0.0, "test": 0.5})
    curate(root, tmp_path / "c", cfg)
    recs = read_manifest(tmp_path / "c" / "manifest.jsonl")
    by_group: dict[str, set] = {}
    for r in recs:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert len(by_group) == 10 and all(len(s) == 1 for s in by_group.values())
    assert {r["split"] for r in recs} == {"train", "test"}
    assert all("patient" not in r["group"] for r in recs)              # only a hash of the patient id is stored
    moved = next(r for r in recs if r["id"] == "r1")
    assert moved["split_from"].startswith("group (declared")


def test_csv_folder_and_webdataset_sources(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    # CSV with its own column names (ROCO-style)
    (root / "roco").mkdir(parents=True)
    for i in range(3):
        _png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), root / "roco" / f"ROCO_{i}.png")
    (root / "roco" / "captions.csv").write_text(
        "name,text,kind\n" + "".join(f"ROCO_{i}.png,Radiograph number {i} of the chest,XR\n" for i in range(3)))
    # an image folder with sidecar captions, one without
    (root / "derm").mkdir()
    for i in range(3):
        _png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), root / "derm" / f"lesion{i}.png")
        if i < 2:
            (root / "derm" / f"lesion{i}.txt").write_text(f"dermoscopy of a pigmented lesion {i}")
    # a WebDataset shard as img2dataset / BIOMEDICA write it
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "000000.tar", "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"H&E stained micrograph {i}".encode()),
                              ("json", json.dumps({"article": f"PMC{i}", "license": "CC-BY"}).encode())):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = _cfg(sources=[
        SourceCfg(name="roco", kind="manifest", path="roco/captions.csv", columns={"image": "name", "caption": "text",
                                                                                    "modality": "kind"}),
        SourceCfg(name="derm", kind="folder", path="derm", licence="CC-BY-NC"),
        SourceCfg(name="pmc", kind="webdataset", path="wds", columns={"group": "article", "licence": "license"}),
    ], split_fractions={"train": 1.0, "probe": 0.0, "test": 0.0})
    summary = curate(root, tmp_path / "c", cfg)
    assert summary["kept"] == 8 and summary["quarantine_reasons"] == {"no caption": 1}
    recs = {r["source"]: r for r in read_manifest(tmp_path / "c" / "manifest.jsonl")}
    assert recs["roco"]["modality"] == "xray" and recs["roco"]["modality_from"] == "source"
    assert recs["derm"]["modality"] == "dermatology" and recs["derm"]["licence"] == "CC-BY-NC"
    assert recs["pmc"]["modality"] == "pathology" and recs["pmc"]["licence"] == "CC-BY"
    assert recs["pmc"]["ext"] == "jpg"                                  # JPEG bytes kept as they came


def test_webdataset_round_trip_through_open_clip_train(corpus, tmp_path):
    """Shards written by curation are read by open_clip_train's own WebDataset pipeline."""
    import open_clip
    from open_clip_train.data import get_dataset_size, get_wds_dataset

    out = tmp_path / "c"
    summary = curate(corpus, out, _cfg())
    shards = sorted((out / "shards").glob("train-*.tar"))
    pattern = str(shards[0])
    assert get_dataset_size(pattern)[0] == summary["kept_per_split"]["train"]   # sizes.json beside the shards
    args = Namespace(val_data=pattern, val_num_samples=None, batch_size=4, workers=0, seed=0, world_size=1,
                     train_data=None)
    tokenizer = open_clip.get_tokenizer("RN50")
    import torchvision.transforms as T

    info = get_wds_dataset(args, T.Compose([T.Resize(32), T.ToTensor()]), is_train=False, tokenizer=tokenizer)
    images, texts = [], []
    for img, tok in info.dataloader:
        images.append(img)
        texts.append(tok)
    n = sum(len(b) for b in images)
    assert n == summary["kept_per_split"]["train"]
    assert images[0].shape[1:] == (3, 32, 32) and texts[0].shape[1] == 77
    captions = {r["caption"] for r in read_manifest(out / "manifest.jsonl") if r["split"] == "train"}
    first = tokenizer(sorted(captions))
    assert any((first == t).all(1).any() for t in texts[0])


def test_store_without_decoded_views_decodes_from_shards(corpus, tmp_path):
    curate(corpus, tmp_path / "views", _cfg(decoded_sizes=[32, 64]))
    curate(corpus, tmp_path / "raw", _cfg(decoded_sizes=[]))
    assert not (tmp_path / "raw" / "decoded").exists() or not any((tmp_path / "raw" / "decoded").iterdir())
    with pytest.raises(CurationError, match="decoded_sizes is empty"):
        load_curated(tmp_path / "raw", "test")
    _, views = load_curated(tmp_path / "views", "test", size=64)
    assert load_curated(tmp_path / "views", "test")[1].shape[1:] == (32, 32, 3)   # the first size by default
    _, decoded = load_curated(tmp_path / "raw", "test", size=64)
    assert np.array_equal(views[:], decoded[:])


def test_scrub_and_modality_rules():
    text, counts = scrub("Seen by Dr. Ann Lee on 2020-01-05 (jane@x.org), accession no. A12-3456")
    assert text == "Seen by [NAME] on [DATE] ([EMAIL]), accession no. [ID]"
    assert counts == {"email": 1, "record_number": 1, "date": 1, "name": 1}
    assert scrub("a 5 mm nodule, grade 2 of 3, 10/20 cells")[1] == {}
    assert resolve_modality("MR", "x") == ("mri", "source")
    assert resolve_modality(None, "Fundus photograph of the optic disc") == ("fundus", "caption")
    assert resolve_modality("PET", "CT and MRI of the head") == ("unknown", "none")   # a tie is not a guess


def test_a_rerun_that_reuses_everything_leaves_the_store_byte_identical(corpus, tmp_path):
    """What DVC hashes must not depend on whether a run decoded or reused: else every later stage re-runs."""
    out = tmp_path / "c"
    first = curate(corpus, out, _cfg())
    files = {p.relative_to(out): _md5(p) for p in sorted(out.rglob("*")) if p.is_file()}
    again = curate(corpus, out, _cfg())
    assert (first["decoded"], again["decoded"], again["reused"]) == (first["kept"], 0, first["kept"])
    assert {p.relative_to(out): _md5(p) for p in sorted(out.rglob("*")) if p.is_file()} == files
