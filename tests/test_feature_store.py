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
from tests.faults.kill_points import CountedConnection, dying_replace, memory_folder

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


# ---------------------------------------------------------------------- the key index (keyindex.py)

def _small_runs(monkeypatch) -> None:
    """Merges after 2 runs, 5-row read blocks, a fence every 4 keys, searches 2 blocks at a time: every path of the
    key index on a few rows."""
    from mmkd.features import keyindex

    monkeypatch.setattr(keyindex, "SEARCH_BLOCKS", 2)
    monkeypatch.setattr(keyindex, "FANOUT", 2)
    monkeypatch.setattr(keyindex, "BLOCK", 5)
    monkeypatch.setattr(keyindex, "FENCE", 4)


def _keys(rng, n: int) -> np.ndarray:
    return np.array([rng.bytes(16).hex() for _ in range(n)], dtype="S32")


def _commit(root: Path, store: FeatureStore, unit: str, keys: np.ndarray) -> None:
    rows = np.ones((len(keys), 1), np.float32)
    write_shard(root, "t", "v1", unit, keys, rows, rows, 1, "float32")
    store.commit("t", "v1", unit)


def test_the_key_index_answers_as_the_sqlite_rows_table_did(tmp_path, monkeypatch):
    """Same (shard, row) as the old layout's rows table (INSERT OR REPLACE per commit, DELETE per dropped shard) for
    keys in any order, absent ones and repeated ones, through binary searches and whole-run scans, across merges."""
    import sqlite3

    _small_runs(monkeypatch)
    rng = np.random.default_rng(7)
    old = sqlite3.connect(":memory:")
    old.execute("CREATE TABLE rows (key BLOB PRIMARY KEY, shard INTEGER, row INTEGER)")
    store = FeatureStore(tmp_path, create=True)
    store.register_set("t", "v1", 1, "float32")
    every = []
    for u in range(11):
        keys = _keys(rng, int(rng.integers(1, 10)))
        if u == 7:  # a key committed again in a later shard: the later row wins, as REPLACE did
            keys[0] = every[3]
        _commit(tmp_path, store, f"u{u}", keys)
        sid = store.db.execute("SELECT id FROM shards WHERE unit=?", (f"u{u}",)).fetchone()[0]
        old.executemany("INSERT OR REPLACE INTO rows VALUES (?,?,?)", [(bytes.fromhex(k.decode()), sid, i)
                                                                       for i, k in enumerate(keys)])
        every += keys.tolist()
    dropped = store.db.execute("SELECT id FROM shards WHERE unit='u2'").fetchone()[0]
    store.drop_shard(dropped)
    old.execute("DELETE FROM rows WHERE shard=?", (dropped,))
    assert len(store.index.runs("t", "v1")) < 11  # merged

    def expected(q):
        got = [old.execute("SELECT shard, row FROM rows WHERE key=?", (bytes.fromhex(k.decode()),)).fetchone()
               for k in q]
        return np.array([g or (-1, -1) for g in got]).T

    absent = _keys(rng, 5).tolist()
    query = np.array(every + absent + every[:4], dtype="S32")[rng.permutation(len(every) + 9)]
    for q in [query, *np.array_split(query, len(query) // 3)]:  # scans (many keys) and fence searches (few)
        shard, row = store.index.lookup("t", "v1", q)
        assert (np.stack([shard, row]) == expected(q)).all()
    live = expected(query)[0] >= 0
    assert store.present("t", "v1", [k.decode() for k in query]) == {k.decode() for k in query[live]}
    assert (store.locate("t", "v1", query)[0] >= 0).sum() == live.sum()
    problems = store.verify()  # as the old check did: u0's key that a later shard took is not at its row
    assert len(problems) == 1 and "u0.keys.npy: 1 of its" in problems[0]


@pytest.fixture()
def shm_dir(tmp_path):
    with memory_folder(tmp_path, "mmkd-keyindex-kills-") as folder:
        yield folder


def test_a_kill_at_any_write_of_the_key_index_leaves_a_store_the_next_run_completes(shm_dir, monkeypatch):
    """SIGKILL at every rename (before or after it) and every transaction's end of committing 6 shards with merges:
    the next run (adopt, then commit what is missing) finds every key at its row, verify passes, no stray files."""
    import shutil
    import signal

    tmp_path = shm_dir
    _small_runs(monkeypatch)
    units = [(f"u{u}", _keys(np.random.default_rng(u), 3 + u)) for u in range(6)]

    def run(root: Path, kill_at: int) -> None:
        store = FeatureStore(root, create=True)
        store.register_set("t", "v1", 1, "float32")
        seen = [0]

        def event():
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        if kill_at:  # < 0: count the events, never kill
            os.replace = dying_replace(seen, event, os.replace)
            store.db = store.index.db = CountedConnection(store.db, event)
        for unit, keys in units:
            _commit(root, store, unit, keys)
        return seen[0]

    real_replace = os.replace
    try:
        total = run(tmp_path / "clean", -1)
    finally:
        os.replace = real_replace
    assert len(FeatureStore(tmp_path / "clean").index.runs("t", "v1")) < len(units) and total > 40
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}"
        pid = os.fork()
        if pid == 0:
            try:
                run(root, k)
            finally:
                os._exit(0)
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status), f"event {k}: not killed"
        store = FeatureStore(root, create=True)
        store.register_set("t", "v1", 1, "float32")
        store.adopt()
        listed = {u for (u,) in store.db.execute("SELECT unit FROM shards")}
        for unit, keys in units:
            if unit not in listed:
                _commit(root, store, unit, keys)
        for unit, keys in units:
            sid = store.db.execute("SELECT id FROM shards WHERE unit=?", (unit,)).fetchone()[0]
            shard, row = store.locate("t", "v1", keys)
            assert (shard == sid).all() and (row == np.arange(len(keys))).all(), f"kill at event {k}: {unit}"
        assert store.verify() == [], f"kill at event {k}"
        runs = {f"{i:010d}" for i, *_ in store.index.runs("t", "v1")}
        stray = [p.name for p in (root / "keyindex" / "t" / "v1").iterdir() if p.name.split(".")[0] not in runs]
        assert not stray, f"kill at event {k}: {stray}"
        store.close()
        shutil.rmtree(root)


def test_an_index_from_before_the_key_index_is_converted_on_open(tmp_path):
    """A store whose index.sqlite has the old rows table (and no runs): opened, it gets runs from its shards' keys
    and loses the table; every key is found at its row."""
    import sqlite3

    rng = np.random.default_rng(3)
    store = FeatureStore(tmp_path, create=True)
    store.register_set("t", "v1", 1, "float32")
    units = [(f"u{u}", _keys(rng, 4)) for u in range(3)]
    for unit, keys in units:
        _commit(tmp_path, store, unit, keys)
    store.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    with db:
        db.execute("DELETE FROM runs")
        db.execute("CREATE TABLE rows (teacher TEXT, version TEXT, key BLOB, shard INTEGER, row INTEGER, "
                   "PRIMARY KEY (teacher, version, key)) WITHOUT ROWID")
    db.close()
    for f in (tmp_path / "keyindex" / "t" / "v1").iterdir():
        f.unlink()
    store = FeatureStore(tmp_path)
    assert not store.db.execute("SELECT name FROM sqlite_master WHERE name='rows'").fetchone()
    for unit, keys in units:
        sid = store.db.execute("SELECT id FROM shards WHERE unit=?", (unit,)).fetchone()[0]
        assert store.locate("t", "v1", keys)[0].tolist() == [sid] * 4
    assert store.verify() == []


def test_a_damaged_key_index_run_is_refused_naming_it_and_rebuilt_from_the_shards(tmp_path):
    rng = np.random.default_rng(5)
    store = FeatureStore(tmp_path, create=True)
    store.register_set("t", "v1", 1, "float32")
    keys = _keys(rng, 6)
    _commit(tmp_path, store, "u0", keys)
    store.close()
    loc = next((tmp_path / "keyindex" / "t" / "v1").glob("*.loc"))
    data = bytearray(loc.read_bytes())
    data[4] ^= 0x01  # the first entry's row: another sample's features, were it not checked
    loc.write_bytes(bytes(data))
    store = FeatureStore(tmp_path)
    with pytest.raises(FeatureError, match=rf"{loc}: sha256"):
        store.locate("t", "v1", keys)
    assert [p for p in store.verify() if str(loc) in p]
    assert store.reindex_damaged() == ["t@v1"] and store.verify() == [] and not loc.exists()
    assert (store.locate("t", "v1", keys)[1] == np.arange(6)).all()
