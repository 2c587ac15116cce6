"""Fault test: cache_features SIGKILLed at 24 seeded points (a shard file write cut in half, a rename, an index
transaction), each followed by a run that completes: every key's features equal an uninterrupted run's, the
store verifies whole, and nothing half-written is left.

The killed runs are forked children of this test process (everything already imported) that kill themselves
with a real SIGKILL at the k-th event; the events are counted by wrapping the store's real I/O in the child only.
The teachers are tiny deterministic numpy stand-ins (the teachers' own code is tested elsewhere): what is under
test is the store's write, rename and commit protocol, so the encoders only need to be fast and deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mmkd.config import FeaturesCfg, TeacherSpec
from mmkd.features import checks
from mmkd.features.cache import cache_corpus
from mmkd.features.store import FeatureStore
from mmkd.models.preprocess import ImageSpec
from tests.faults.kill_points import CountedConnection, dying_replace, memory_folder

RECORDS, KILLS, SEED = 40, 24, 20261206
CFG = FeaturesCfg(batch_size=4, unit_records=8, decode_workers=1)


class StandIn:
    """A teacher's interface (spec, version, embed_dim, encode_images, encode_texts), in numpy."""

    def __init__(self, name: str, size: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.name, self.spec, self.version, self.embed_dim = name, ImageSpec(size), f"{name}-v1", dim
        self.w_img, self.w_txt = rng.normal(size=(48, dim)), rng.normal(size=(256, dim))

    def encode_images(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        n, s = len(images), images.shape[1]
        pooled = images[:, : s // 4 * 4, : s // 4 * 4].reshape(n, 4, s // 4, 4, s // 4, 3).mean((2, 4))
        return unit(pooled.reshape(n, 48) / 255.0 @ self.w_img)

    def encode_texts(self, texts: list[str], batch_size: int = 512) -> np.ndarray:
        counts = np.stack([np.bincount(np.frombuffer(t.encode(), np.uint8), minlength=256) for t in texts])
        return unit(counts @ self.w_txt)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# one teacher served by curation's decoded views, one decoding the tar shards (a size curation did not write)
TEACHERS = [(TeacherSpec(name="views", model="stand-in", modalities=["xray"]), StandIn("views", 48, 12, 1)),
            (TeacherSpec(name="decoded", model="stand-in", modalities=["pathology"]), StandIn("decoded", 40, 7, 2))]


def small_corpus(curated: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("shards", "decoded", "summary.json"):
        os.symlink(curated / name, dest / name)
    lines = (curated / "manifest.jsonl").read_text().splitlines(keepends=True)
    (dest / "manifest.jsonl").write_text("".join(lines[:RECORDS]))
    return dest


def arm(kill_at: int, counter: Path) -> None:
    """In the child: count write / rename / commit events through the real calls; SIGKILL at event `kill_at`
    (0: never; the count is written to `counter`)."""
    seen = [0]

    def event(cut=None) -> None:
        seen[0] += 1
        counter.write_text(str(seen[0]))
        if seen[0] == kill_at:
            if cut:
                cut()
            os.kill(os.getpid(), signal.SIGKILL)

    real_write, real_replace, real_connect = checks.HashingFile.write, os.replace, sqlite3.connect

    def write(self, data):
        def half():  # half the bytes reach the file, then the process dies
            self.fh.write(memoryview(data).cast("B")[: len(data) // 2])
            self.fh.flush()
        event(half)
        return real_write(self, data)

    checks.HashingFile.write = write
    os.replace = dying_replace(seen, event, real_replace)
    sqlite3.connect = lambda *a, **kw: CountedConnection(real_connect(*a, **kw), event)


def cache_in_child(curated: Path, store: Path, kill_at: int, counter: Path) -> int:
    """Run cache_features in a forked child armed to die at event kill_at; returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            arm(kill_at, counter)
            cache_corpus(curated, store, TEACHERS, CFG, show_progress=False)
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def committed_rows(store_root: Path) -> int:
    if not (store_root / "index.sqlite").exists():
        return 0
    db = sqlite3.connect(store_root / "index.sqlite")
    try:
        return db.execute("SELECT COALESCE(SUM(rows), 0) FROM shards").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the schema was committed
        return 0
    finally:
        db.close()


def features(store_root: Path, keys: np.ndarray) -> dict:
    store = FeatureStore(store_root)
    out = {}
    for s in store.sets():
        shard, row = store.locate(s["teacher"], s["version"], keys)
        assert (shard >= 0).all(), f"{s['teacher']}: {int((shard < 0).sum())} keys without features"
        out[s["teacher"]] = store.gather(shard, row, s["dim"])
    assert store.verify() == []
    store.close()
    return out


@pytest.fixture()
def fast_dir(tmp_path):
    with memory_folder(tmp_path, "mmkd-cache-kills-") as folder:
        yield folder


def test_sigkill_at_seeded_points_then_a_run_gives_the_features_of_a_clean_run(smoke_corpus, tmp_path, fast_dir):
    curated = small_corpus(smoke_corpus / "artifacts" / "curated", tmp_path / "curated")
    keys = np.array([json.loads(line)["key"] for line in open(curated / "manifest.jsonl")], dtype="S32")
    counter = fast_dir / "events"
    status = cache_in_child(curated, fast_dir / "clean", 0, counter)  # counts the events of an uninterrupted run
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    total = int(counter.read_text())
    assert total > 3 * KILLS
    clean = features(fast_dir / "clean", keys)
    points = sorted(np.random.default_rng(SEED).choice(np.arange(1, total + 1), KILLS, replace=False).tolist())
    for k in points:
        store = fast_dir / f"killed-{k}"
        status = cache_in_child(curated, store, k, counter)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"event {k}: not killed"
        assert int(counter.read_text()) == k
        kept = committed_rows(store)
        done = cache_corpus(curated, store, TEACHERS, CFG, show_progress=False)
        # what the killed run committed, or wrote whole (adopted), is not computed again; the rest is
        redone = sum(done["forwarded"].values())
        assert redone == 2 * RECORDS - kept - CFG.unit_records * done["adopted_shards"], f"event {k}"
        resumed = features(store, keys)
        for t in clean:
            assert np.array_equal(resumed[t][0], clean[t][0]) and np.array_equal(resumed[t][1], clean[t][1]), \
                f"event {k}: teacher {t}'s features differ from an uninterrupted run's"
        assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")], f"event {k}: temp files left"
        assert not list((store / "plans").glob("*.json")), f"event {k}: plans left"
