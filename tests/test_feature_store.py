"""Feature store tests: caching into shards, incremental runs, kill-and-resume, bad features, align, Dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd.config import AlignCfg, FeaturesCfg, TeacherSpec
from mmkd.data.store import split_records
from mmkd.features.align import align
from mmkd.features.cache import cache_corpus, plan_units, TeacherEntry
from mmkd.features.store import FeatureError, FeatureStore, write_shard
from mmkd.models.encoder import ClipEncoder
from mmkd.models.factory import create_model, save_checkpoint
from mmkd.teachers.registry import load_teacher

CPU = torch.device("cpu")
SPECS = [TeacherSpec(name="rad", model="mmkd-teacher-vit-t", modalities=["xray", "ct", "mri", "ultrasound"]),
         TeacherSpec(name="path", model="mmkd-teacher-rn", modalities=["pathology"])]


@pytest.fixture(scope="module")
def teachers_dir(tmp_path_factory) -> Path:
    """Two untrained embedded teachers of different widths, input sizes and domains."""
    folder = tmp_path_factory.mktemp("teachers")
    for spec in SPECS:
        torch.manual_seed(0)
        save_checkpoint(create_model(spec.model), folder / spec.name, spec.model)
    return folder


def loaded(teachers_dir):
    return [(spec, load_teacher(spec, teachers_dir, CPU)) for spec in SPECS]


def all_features(store_root: Path, curated: Path, teacher: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    store = FeatureStore(store_root)
    version = [s for s in store.sets() if s["teacher"] == teacher][0]
    keys = np.array([json.loads(line)["key"] for line in open(curated / "manifest.jsonl")], dtype="S32")
    shard, row = store.locate(teacher, version["version"], keys)
    img, txt = store.gather(shard, row, version["dim"])
    store.close()
    return shard, img, txt


def partial_corpus(curated: Path, dest: Path, keep: int) -> Path:
    """A curated store whose manifest lists only the first `keep` records (the shards are shared)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("shards", "decoded", "summary.json", "tasks.json"):
        if not (dest / name).exists():
            os.symlink(curated / name, dest / name)
    lines = (curated / "manifest.jsonl").read_text().splitlines(keepends=True)
    (dest / "manifest.jsonl").write_text("".join(lines[:keep]))
    return dest


def test_cache_writes_unit_norm_features_equal_to_the_teachers_own(smoke_corpus, teachers_dir, tmp_path):
    curated = smoke_corpus / "artifacts" / "curated"
    pairs = loaded(teachers_dir)
    cfg = FeaturesCfg(batch_size=64, unit_records=100)
    done = cache_corpus(curated, tmp_path / "store", pairs, cfg, show_progress=False)
    n = sum(1 for _ in open(curated / "manifest.jsonl"))
    assert done["forwarded"] == {"rad": n, "path": n} and done["units"] == -(-n // 100)
    store = FeatureStore(tmp_path / "store")
    assert {(s["teacher"], s["dim"]) for s in store.sets()} == {("rad", 160), ("path", 96)}
    assert all(p.stat().st_size > 0 for p in (tmp_path / "store" / "shards").glob("*/*/*.npy"))
    assert not list((tmp_path / "store").rglob("*.tmp"))
    records = split_records(curated, "test")[:5]
    from PIL import Image
    for spec, enc in pairs:
        shard, img, txt = all_features(tmp_path / "store", curated, spec.name)
        assert (shard >= 0).all()
        assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
        keys = np.array([r["key"] for r in records], dtype="S32")
        s, r = store.locate(spec.name, enc.version, keys)
        got_img, got_txt = store.gather(s, r, enc.embed_dim)
        pil = []
        for rec in records:  # the teacher's own forward on the stored image, preprocessed by its own spec
            with open(curated / "shards" / f"{rec['shard']}.tar", "rb") as fh:
                fh.seek(rec["offset"])
                import io
                pil.append(Image.open(io.BytesIO(fh.read(rec["size"]))).convert("RGB"))
        assert np.allclose(got_img, enc.encode_pil(pil), atol=1e-5)
        assert np.allclose(got_txt, enc.encode_texts([rec["caption"] for rec in records]), atol=1e-5)
    stats = store.stats({"test": np.array([r["key"] for r in split_records(curated, "test")], dtype="S32")})
    assert all(e["coverage"]["test"] == 1.0 and e["shards"] == done["units"] for e in stats["sets"])
    store.close()


def test_incremental_run_embeds_only_the_new_pairs(smoke_corpus, teachers_dir, tmp_path):
    curated = smoke_corpus / "artifacts" / "curated"
    n = sum(1 for _ in open(curated / "manifest.jsonl"))
    keep = int(n * 0.9)
    part = partial_corpus(curated, tmp_path / "curated", keep)
    cfg = FeaturesCfg(batch_size=64, unit_records=64)
    first = cache_corpus(part, tmp_path / "store", loaded(teachers_dir), cfg, show_progress=False)
    assert first["forwarded"] == {"rad": keep, "path": keep}
    _, before, _ = all_features(tmp_path / "store", part, "rad")
    full = partial_corpus(curated, tmp_path / "curated", n)
    second = cache_corpus(full, tmp_path / "store", loaded(teachers_dir), cfg, show_progress=False)
    assert second["forwarded"] == {"rad": n - keep, "path": n - keep}
    shard, after, _ = all_features(tmp_path / "store", full, "rad")
    assert (shard >= 0).all() and np.array_equal(after[:keep], before)
    index = (tmp_path / "store" / "index.sqlite").read_bytes()
    third = cache_corpus(full, tmp_path / "store", loaded(teachers_dir), cfg, show_progress=False)
    assert third["forwarded"] == {} and third["units"] == 0
    # nothing to add writes nothing: DVC sees the store unchanged and later stages stay up to date
    assert (tmp_path / "store" / "index.sqlite").read_bytes() == index


def test_domain_coverage_gives_each_train_sample_its_domain_teachers(smoke_corpus, teachers_dir, tmp_path):
    curated = smoke_corpus / "artifacts" / "curated"
    cache_corpus(curated, tmp_path / "store", loaded(teachers_dir), FeaturesCfg(coverage="domain"), show_progress=False)
    records = [json.loads(line) for line in open(curated / "manifest.jsonl")]
    shard, _, _ = all_features(tmp_path / "store", curated, "path")
    covered = shard >= 0
    for rec, c in zip(records, covered):
        assert c == (rec["split"] != "train" or rec["modality"] == "pathology"), rec["id"]


KILL_SCRIPT = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(2)
from mmkd.config import FeaturesCfg, TeacherSpec
from mmkd.features.cache import cache_corpus
from mmkd.teachers.registry import load_teacher
curated, store, teachers = map(Path, sys.argv[1:4])
specs = [TeacherSpec(name="rad", model="mmkd-teacher-vit-t", modalities=["xray", "ct", "mri", "ultrasound"]),
         TeacherSpec(name="path", model="mmkd-teacher-rn", modalities=["pathology"])]
pairs = [(s, load_teacher(s, teachers, torch.device("cpu"))) for s in specs]
for _, enc in pairs:  # slow the forwards so that the kill lands mid-run
    fwd = enc.forward_images
    enc.forward_images = lambda x, fwd=fwd: (time.sleep(0.03), fwd(x))[1]
cache_corpus(curated, store, pairs, FeaturesCfg(batch_size=8, unit_records=16), show_progress=False)
"""


def test_sigkill_then_resume_gives_the_features_of_an_uninterrupted_run(smoke_corpus, teachers_dir, tmp_path):
    curated = smoke_corpus / "artifacts" / "curated"
    torch.set_num_threads(2)
    script = tmp_path / "cache.py"
    script.write_text(KILL_SCRIPT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(curated), str(killed), str(teachers_dir)])
    deadline = time.time() + 120
    while len(list(killed.glob("shards/*/*/*.keys.npy"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the caching process ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = cache_corpus(curated, killed, loaded(teachers_dir), FeaturesCfg(batch_size=8, unit_records=16),
                           show_progress=False)
    n = sum(1 for _ in open(curated / "manifest.jsonl"))
    assert 0 < resumed["forwarded"]["rad"] < n  # it continued where it stopped, not from scratch
    clean = cache_corpus(curated, tmp_path / "clean", loaded(teachers_dir), FeaturesCfg(batch_size=8, unit_records=16),
                         show_progress=False)
    assert clean["forwarded"] == {"rad": n, "path": n}
    for t in ("rad", "path"):
        s1, i1, t1 = all_features(killed, curated, t)
        s2, i2, t2 = all_features(tmp_path / "clean", curated, t)
        assert (s1 >= 0).all() and np.array_equal(i1, i2) and np.array_equal(t1, t2)
    assert not list(killed.rglob("*.tmp"))


def test_uncommitted_whole_shards_are_adopted_and_partial_files_removed(tmp_path):
    store = FeatureStore(tmp_path, create=True)
    store.register_set("t", "v1", 4, "float32")
    keys = np.array([f"{i:032x}" for i in range(3)], dtype="S32")
    feats = np.eye(3, 4, dtype=np.float32)
    write_shard(tmp_path, "t", "v1", "u1", keys, feats, feats, 4, "float32")
    (tmp_path / "shards" / "t" / "v1" / "u2.image.npy.tmp").write_bytes(b"half")
    assert (store.locate("t", "v1", keys)[0] == -1).all()  # written but not yet indexed: invisible
    assert store.adopt() == {"adopted_shards": 1, "removed_partial_files": 1}
    shard, row = store.locate("t", "v1", np.array([keys[2], b"f" * 32], dtype="S32"))
    assert shard[0] >= 0 and shard[1] == -1
    img, _ = store.gather(shard, row, 4)
    assert np.array_equal(img[0], feats[2]) and not img[1].any()
    assert store.prune({("t", "v2")}) == ["t@v1"] and store.sets() == []


def test_bad_features_are_refused_naming_the_sample(smoke_corpus, teachers_dir, tmp_path):
    keys = np.array(["a" * 32, "b" * 32], dtype="S32")
    nan = np.ones((2, 4), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(FeatureError, match=r"teacher 't': image features of sample 'rec-2' \(key b{32}\) are not finite"):
        write_shard(tmp_path, "t", "v", "u", keys, nan, np.ones((2, 4), np.float32), 4, "float32", ids=["rec-1", "rec-2"])
    with pytest.raises(FeatureError, match=r"text features have shape \(2, 3\), expected \[n, 4\]"):
        write_shard(tmp_path, "t", "v", "u", keys, np.ones((2, 4)), np.ones((2, 3)), 4, "float32")
    assert not list(tmp_path.rglob("*.npy"))

    class Broken(ClipEncoder):
        def forward_images(self, x):
            out = super().forward_images(x)
            out[3] = float("inf")
            return out

    curated = smoke_corpus / "artifacts" / "curated"
    spec = SPECS[0]
    good = load_teacher(spec, teachers_dir, CPU)
    broken = Broken("rad", good.model, good.tokenizer, CPU, good.spec, good.version)
    first = json.loads(open(curated / "manifest.jsonl").readlines()[3])["id"]
    with pytest.raises(FeatureError, match=f"teacher 'rad': image features of sample '{first}'"):
        cache_corpus(curated, tmp_path / "store", [(spec, broken)], FeaturesCfg(batch_size=32), show_progress=False)


def test_plan_is_empty_when_everything_is_cached_and_names_versions(smoke_corpus, teachers_dir, tmp_path):
    curated = smoke_corpus / "artifacts" / "curated"
    pairs = loaded(teachers_dir)
    cache_corpus(curated, tmp_path / "store", pairs, FeaturesCfg(), show_progress=False)
    store = FeatureStore(tmp_path / "store")
    entries = [TeacherEntry(s.name, e.version, e.embed_dim, tuple(s.modalities)) for s, e in pairs]
    assert plan_units(curated, store, entries, 4096, "all") == []
    # a new teacher version (retrained weights) needs every pair again; the old version is pruned afterwards
    entries[0] = TeacherEntry("rad", "other-version", 160, entries[0].modalities)
    plans = plan_units(curated, store, entries, 4096, "all")
    assert plans and set(json.loads(plans[0].read_text())["need"]) == {"rad"}


def test_align_projects_every_shard_to_unit_student_vectors(smoke_corpus, teachers_dir, tmp_path):
    curated = smoke_corpus / "artifacts" / "curated"
    pairs = loaded(teachers_dir)
    cache_corpus(curated, tmp_path / "raw", pairs, FeaturesCfg(unit_records=128), show_progress=False)
    train = np.array([r["key"] for r in split_records(curated, "train")], dtype="S32")
    sets = [(s.name, e.version) for s, e in pairs]
    stats = align(tmp_path / "raw", sets, train, tmp_path / "aligned", 64, AlignCfg(method="autoencoder", hidden=32, epochs=2), 0, "float16")
    assert "recon_mse_rad" in stats and (tmp_path / "aligned" / "projector" / "projector.safetensors").exists()
    store = FeatureStore(tmp_path / "aligned")
    got = {s["teacher"]: s for s in store.sets()}
    assert {t: s["version"] for t, s in got.items()} == {t: f"{v}-{stats['projector']}" for t, v in sets}
    assert all(s["dim"] == 64 and s["dtype"] == "float16" for s in got.values())
    shard, img, txt = all_features(tmp_path / "aligned", curated, "path")
    assert (shard >= 0).all() and np.allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    again = align(tmp_path / "raw", sets, train, tmp_path / "aligned", 64, AlignCfg(method="autoencoder", hidden=32, epochs=2), 0, "float16")
    assert again["projector"] == stats["projector"]  # seeded: the same projector, the same aligned versions


def test_a_teacher_unlike_the_views_gets_its_own_preprocessing_from_the_shards(smoke_corpus, teachers_dir, tmp_path):
    """Bilinear squash is no decoded view: the image is decoded from the tar shard and prepared by the spec."""
    import io

    from PIL import Image

    from mmkd.config import PreprocessCfg

    curated = smoke_corpus / "artifacts" / "curated"
    spec = SPECS[0].model_copy(update={"preprocess": PreprocessCfg(interpolation="bilinear", resize_mode="squash")})
    enc = load_teacher(spec, teachers_dir, CPU)
    assert enc.spec.interpolation == "bilinear" and enc.version != load_teacher(SPECS[0], teachers_dir, CPU).version
    cache_corpus(curated, tmp_path / "store", [(spec, enc)], FeaturesCfg(batch_size=64), show_progress=False)
    records = split_records(curated, "probe")[:6]
    pil = []
    for rec in records:
        with open(curated / "shards" / f"{rec['shard']}.tar", "rb") as fh:
            fh.seek(rec["offset"])
            pil.append(Image.open(io.BytesIO(fh.read(rec["size"]))).convert("RGB"))
    store = FeatureStore(tmp_path / "store")
    got, _ = store.gather(*store.locate("rad", enc.version, np.array([r["key"] for r in records], dtype="S32")), 160)
    assert np.allclose(got, enc.encode_pil(pil), atol=1e-5)
