"""Data tests: the synthetic corpus, manifests and curation, including bad input."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mmkd.config import MODALITIES, CurateCfg, SynthCfg
from mmkd.data.curate import CurationError, curate, load_curated
from mmkd.data.manifest import ManifestError, read_manifest, write_jsonl
from mmkd.data.synth import SPECS, generate, render_sample, zero_shot_prompts


def test_render_is_deterministic_and_depends_on_seed():
    a, ra = render_sample(7, "xray", "train", 3, 64, 0.5)
    b, rb = render_sample(7, "xray", "train", 3, 64, 0.5)
    c, _ = render_sample(8, "xray", "train", 3, 64, 0.5)
    assert np.array_equal(a, b) and ra == rb
    assert not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_modalities_look_distinct():
    """Mean colour/intensity statistics separate the nine modalities."""
    stats = {}
    for m in MODALITIES:
        imgs = np.stack([render_sample(0, m, "train", i, 64, 0.5)[0] for i in range(6)]).astype(float)
        stats[m] = np.concatenate([imgs.mean((0, 1, 2)), imgs.std((0, 1, 2))])
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(stats[a] - stats[b]).max() > 3, (a, b)


@pytest.mark.parametrize("modality", MODALITIES)
def test_findings_are_learnable_from_pixels(modality):
    """A linear model on colour histograms + coarse pixels beats chance on every modality: labels are in the image."""
    from sklearn.linear_model import LogisticRegression

    def batch(split, n):
        pairs = [render_sample(0, modality, split, i, 48, 0.3) for i in range(n)]
        imgs = np.stack([p[0] for p in pairs]).astype(float) / 255.0
        hist = np.stack([np.concatenate([np.histogram(im[..., c], 16, (0, 1))[0] for c in range(3)]) for im in imgs])
        coarse = imgs.reshape(n, 8, 6, 8, 6, 3).mean((2, 4)).reshape(n, -1)
        x = np.concatenate([hist / imgs[0, ..., 0].size, coarse], 1)
        return x, [p[1]["labels"]["finding"] for p in pairs]

    xtr, ytr = batch("train", 90)
    xte, yte = batch("test", 45)
    acc = LogisticRegression(max_iter=2000, C=10.0).fit(xtr, ytr).score(xte, yte)
    assert acc > 0.5, f"{modality}: pixel probe accuracy {acc:.2f} (chance 0.33)"


def test_captions_vary_and_name_the_finding():
    caps = [render_sample(0, "mri", "train", i, 32, 0.5)[1]["caption"] for i in range(60)]
    assert len(set(caps)) > 30
    tumor = [render_sample(0, "mri", "train", i, 32, 0.5)[1] for i in range(1, 60, 3)]
    assert all(r["labels"]["finding"] == "tumor" for r in tumor)
    assert any("glioma" in r["caption"] or "tumor" in r["caption"] or "mass" in r["caption"] for r in tumor)


def test_prompts_cover_every_class():
    for m in MODALITIES:
        prompts = zero_shot_prompts(m)
        assert list(prompts) == list(SPECS[m].findings)
        assert all(len(p) >= 4 for p in prompts.values())


def test_generate_writes_manifest_pngs_and_tasks(tmp_path):
    cfg = SynthCfg(image_size=32, modalities=["ct", "oct"], train_per_modality=6, probe_per_modality=4,
                   test_per_modality=4, workers=1)
    generate(cfg, 3, tmp_path)
    recs = read_manifest(tmp_path / "manifest.jsonl")
    assert len(recs) == 2 * (6 + 4 + 4)
    assert {r["split"] for r in recs} == {"train", "probe", "test"}
    with Image.open(tmp_path / recs[0]["image"]) as im:
        assert im.format == "PNG" and im.size == (32, 32)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert set(tasks) == {"ct-finding", "oct-finding"}


@pytest.fixture()
def raw_dir(tmp_path):
    cfg = SynthCfg(image_size=32, modalities=["xray", "pathology"], train_per_modality=6, probe_per_modality=4,
                   test_per_modality=4, workers=1)
    generate(cfg, 0, tmp_path / "data")
    return tmp_path / "data"


def _append(manifest, lines):
    with open(manifest, "a") as fh:
        for line in lines:
            fh.write(line + "\n")


def test_curate_quarantines_bad_records_and_keeps_the_good(raw_dir, tmp_path):
    manifest = raw_dir / "manifest.jsonl"
    good = read_manifest(manifest)
    (raw_dir / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    shutil.copy(raw_dir / good[0]["image"], raw_dir / "images" / "copy.png")
    base = {"modality": "xray", "split": "train", "labels": {"finding": "normal"}}
    bad = [
        json.dumps({**base, "id": "corrupt", "image": "images/corrupt.png", "caption": "a chest X-ray"}),
        json.dumps({**base, "id": "empty-caption", "image": good[1]["image"], "caption": "   "}),
        json.dumps({**base, "id": "missing", "image": "images/nowhere.png", "caption": "a chest X-ray"}),
        '{"id": "truncated", "image": ',
        json.dumps({**base, "id": "dup-content", "image": "images/copy.png", "caption": "a chest X-ray"}),
        json.dumps({**base, "id": "bad-modality", "image": good[2]["image"], "caption": "a scan", "modality": "pet"}),
        json.dumps({"id": "no-caption", "image": good[3]["image"], "modality": "xray", "split": "train"}),
    ]
    _append(manifest, bad)
    summary = curate(manifest, tmp_path / "curated", CurateCfg(image_size=24))
    assert summary["kept"] == len(good)
    assert summary["quarantined"] == len(bad)
    q = read_manifest_lines(tmp_path / "curated" / "quarantine.jsonl")
    reasons = {r["id"]: r["reason"] for r in q}
    assert "unreadable image images/corrupt.png" in reasons["corrupt"]
    assert reasons["empty-caption"] == "empty caption"
    assert "image file not found: images/nowhere.png" in reasons["missing"]
    assert reasons["dup-content"].startswith("duplicate image content of")
    assert "unknown modality 'pet'" in reasons["bad-modality"]
    assert "missing field 'caption'" in reasons["no-caption"]
    malformed = [r for r in q if r["reason"].startswith("invalid JSON")]
    assert len(malformed) == 1 and malformed[0]["line"] == len(good) + 4 and malformed[0]["id"] is None
    assert malformed[0]["record"] == '{"id": "truncated", "image": '  # the raw line is kept verbatim
    records, images = load_curated(tmp_path / "curated", "train")
    assert images.shape == (len(records), 24, 24, 3)
    assert all(r["width"] == 24 for r in records)


def read_manifest_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_curate_with_nothing_usable_fails_clearly(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "image": "x.png", "caption": "c", "modality": "ct", "split": "train"}])
    with pytest.raises(CurationError, match="no usable records"):
        curate(tmp_path / "m.jsonl", tmp_path / "out", CurateCfg(image_size=16))


def test_curate_reads_jpeg(raw_dir, tmp_path):
    recs = read_manifest(raw_dir / "manifest.jsonl")
    Image.open(raw_dir / recs[0]["image"]).convert("RGB").save(raw_dir / "images" / "a.jpg", quality=90)
    recs[0] = {**recs[0], "image": "images/a.jpg"}
    write_jsonl(raw_dir / "manifest.jsonl", recs)
    summary = curate(raw_dir / "manifest.jsonl", tmp_path / "c", CurateCfg(image_size=16))
    assert summary["quarantined"] == 0


def test_strict_manifest_read_names_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "i", "caption": "c", "modality": "ct", "split": "train"}\n{oops\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: invalid JSON"):
        read_manifest(tmp_path / "m.jsonl")
