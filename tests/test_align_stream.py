"""Model tests of the align step's streaming: the student's embeddings on disk read back by row, the fit over a
feature store in small chunks equal to the fit in memory, the diagnostic reading only the samples it measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkd.config import AlignCfg
from mmkd.features import diagnostics
from mmkd.features.align import KeyModality, Split, Streamed, align
from mmkd.features.projector import LinearMaps, fit_maps, load_projector
from mmkd.features.reader import TeacherFeatures
from mmkd.features.store import FeatureStore, write_shard
from mmkd.features.student import StudentRows, write_rows

DOMAINS = {"a": ["x"], "b": ["x", "y"]}


def _world(seed: int, n: int):
    """Two modalities, a shared latent per pair seen by the student (8-d) and two teachers (10-d, 7-d), each in its
    own rotation with its own modality offsets and noise."""
    rng = np.random.default_rng(seed)
    modality = np.array(["x", "y"] * (n // 2))
    z_img = rng.standard_normal((n, 6))
    z_txt = z_img + 0.3 * rng.standard_normal((n, 6))

    def view(d, noise):
        rot = np.linalg.qr(rng.standard_normal((max(6, d), max(6, d))))[0][:6, :d]
        shift = np.stack([{"x": 3.0, "y": -3.0}[m] * np.ones(d) for m in modality]) + rng.standard_normal(d)
        return tuple((z @ rot + shift + noise * rng.standard_normal((n, d))).astype(np.float32) for z in (z_img, z_txt))

    student = tuple((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for v in view(8, 1.0))
    return modality, student, {"a": view(10, 0.5), "b": view(7, 0.5)}


class _InMemory:
    """TeacherFeatures' reading interface over whole arrays (the fit as it was: everything in RAM)."""

    def __init__(self, feats, available):
        self.feats, self.names, self.available = feats, list(feats), available
        self.dims = [a.shape[1] for a, _ in feats.values()]

    def batch(self, idx):
        return {t: (a[idx], b[idx]) for t, (a, b) in self.feats.items()}


def _store(root, keys, feats, held, shard_rows=16):
    """A raw feature store of `feats`, shards of `shard_rows` keys; teacher t holds only the keys where held[t]."""
    store = FeatureStore(root, create=True)
    for t, (img, txt) in feats.items():
        store.register_set(t, "v1", img.shape[1], "float32")
        for u, at in enumerate(range(0, len(keys), shard_rows)):
            sel = np.arange(at, min(len(keys), at + shard_rows))
            sel = sel[held[t][sel]]
            write_shard(root, t, "v1", f"u{u}", keys[sel], img[sel], txt[sel], img.shape[1], "float32")
            store.commit(t, "v1", f"u{u}")
    return store


def test_student_rows_read_back_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    img, txt = (rng.standard_normal((23, 5)).astype(np.float32) for _ in range(2))
    rows = write_rows(tmp_path / "s", 23, 5, ((img[i : i + 7], txt[i : i + 7]) for i in range(0, 23, 7)))
    idx = np.array([22, 3, 4, 5, 5, 0, 17, 18])  # any order, repeats, runs
    got = StudentRows(tmp_path / "s").rows(idx)
    assert np.array_equal(got[0], img[idx]) and np.array_equal(got[1], txt[idx])
    assert rows.rows(np.zeros(0, np.int64))[0].shape == (0, 5)
    with pytest.raises(IndexError, match="outside"):
        rows.rows(np.array([23]))
    with pytest.raises(ValueError, match="10 rows written, 23 announced"):
        write_rows(tmp_path / "short", 23, 5, [(img[:10], txt[:10])])
    assert not (tmp_path / "short" / "image.npy").exists()  # a failed write leaves no file
    (tmp_path / "s" / "text.npy").write_bytes((tmp_path / "s" / "text.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        StudentRows(tmp_path / "s").rows(np.array([22]))


@pytest.mark.parametrize("method", ["consensus", "shared", "procrustes"])
def test_streamed_fit_equals_the_in_memory_fit(tmp_path, method):
    n = 90
    modality, student, feats = _world(2, n)
    keys = np.array([f"{i:032x}" for i in range(n)], dtype="S32")
    held = {"a": np.arange(n) % 5 != 0, "b": np.ones(n, bool)}  # a misses every fifth sample
    store = _store(tmp_path / "raw", keys, feats, held)
    rows = write_rows(tmp_path / "student", n, 8, ((student[0][i : i + 7], student[1][i : i + 7])
                                                    for i in range(0, n, 7)))
    cfg = AlignCfg(method=method, iterations=3)
    streamed = fit_maps(Streamed(store, [("a", "v1"), ("b", "v1")], keys), rows, modality, DOMAINS, method, cfg,
                        chunk=7)
    in_ram = fit_maps(_InMemory(feats, np.stack([held["a"], held["b"]], 1)), student, modality, DOMAINS, method, cfg,
                      chunk=10 * n)
    assert streamed.groups == in_ram.groups
    for name, w in in_ram.state_dict().items():
        assert torch.allclose(streamed.state_dict()[name], w, atol=1e-5), name
    assert in_ram.state_dict()["weights.a@*"].abs().sum() > 1  # fitted, not left at zero


def test_shared_space_reads_only_the_samples_it_measures():
    rng = np.random.default_rng(4)
    n = 300
    modality = np.array(["x", "y", "z"] * 100)
    domains = {"a": ["x", "y"], "b": ["x", "y"], "c": ["y"]}
    images = {t: rng.standard_normal((n, 4)) for t in domains}
    avail = {t: rng.random(n) > 0.1 for t in domains}
    asked = []

    def read(idx):
        asked.append(np.asarray(idx))
        return {t: x[idx] for t, x in images.items()}

    rows = diagnostics.shared_space_read(read, avail, modality, domains, 0, max_samples=20, chunk=16)
    # the same numbers as measuring on whole arrays, each pair on its seeded subset of 20
    sel = np.flatnonzero((modality == "x") & avail["a"] & avail["b"])
    pair_rng = np.random.default_rng([0, *np.frombuffer(b"x|a|b", np.uint8).astype(np.uint64).tolist()])
    sel = np.sort(pair_rng.choice(sel, 20, replace=False))
    assert rows[0] == {"modality": "x", "pair": "a|b", "n": 20,
                       **diagnostics.pair_agreement(images["a"][sel], images["b"][sel], pair_rng)}
    assert [(r["modality"], r["pair"]) for r in rows] == [("x", "a|b"), ("y", "a|b"), ("y", "a|c"), ("y", "b|c")]
    seen = np.concatenate(asked)
    assert max(len(a) for a in asked) <= 16 and len(seen) == len(np.unique(seen)) <= 4 * 20
    assert rows == diagnostics.shared_space(images, avail, modality, domains, 0, max_samples=20)


def test_align_streams_to_the_same_maps_and_space_as_in_memory(tmp_path):
    """The whole step's library call: a student on disk and one in memory give the same maps and diagnostic."""
    n = 120
    modality, student, feats = _world(5, n)
    keys = np.array([f"{i:032x}" for i in range(n)], dtype="S32")
    held = {"a": np.arange(n) % 7 != 0, "b": np.ones(n, bool)}
    _store(tmp_path / "raw", keys, feats, held).close()
    train, probe = np.arange(n) < 80, np.arange(n) >= 80
    labels = [["c0", "c1"][i % 4 // 2] for i in range(n)]
    split = lambda m: Split(keys[m], modality[m], [labels[i] for i in np.flatnonzero(m)])  # noqa: E731
    modality_of = {bytes(k): m for k, m in zip(keys, modality)}
    disk = write_rows(tmp_path / "student", 80, 8, [(student[0][:80], student[1][:80])])
    results = {}
    compact = KeyModality(keys, modality)
    for name, s, mods in (("disk", disk, compact), ("ram", (student[0][:80], student[1][:80]), modality_of)):
        results[name] = align(tmp_path / "raw", [("a", "v1"), ("b", "v1")], split(train), tmp_path / name, 8,
                              AlignCfg(iterations=2), 0, "float32", DOMAINS, s, split(probe), mods, chunk=9)
    maps = [load_projector(tmp_path / name / "projector") for name in results]
    assert isinstance(maps[0], LinearMaps)
    for k, w in maps[1].state_dict().items():
        assert torch.allclose(maps[0].state_dict()[k], w, atol=1e-5), k
    space = {name: r["space"] for name, r in results.items()}
    for part in ("aligned", "procrustes"):
        a, b = space["disk"][part]["pairs"], space["ram"][part]["pairs"]
        # the probe's x samples that both teachers hold (a misses 84, 98 and 112)
        assert [r["n"] for r in a] == [r["n"] for r in b] == [17]
        for ra, rb in zip(a, b):
            assert ra["gap"] == pytest.approx(rb["gap"], abs=1e-5) and ra["nn_rate"] == rb["nn_rate"]
    assert space["disk"]["aligned"]["summary"]["gap_min"] > 0.3  # the shared latent is found
    assert results["disk"]["projected_rows"] == results["ram"]["projected_rows"] == int(held["a"].sum() + n)
    # the projections themselves (each key through its modality's map) agree
    got = {}
    for name in results:
        store = FeatureStore(tmp_path / name)
        got[name] = TeacherFeatures(store, [(x["teacher"], x["version"]) for x in store.sets()], keys).batch(
            np.arange(n))
        store.close()
    for t in ("a", "b"):
        for k in (0, 1):
            assert np.allclose(got["disk"][t][k], got["ram"][t][k], atol=1e-5)


def test_key_modality_looks_keys_up_compactly():
    keys = np.array([b"k3", b"k1", b"k2"], dtype="S32")
    index = KeyModality(keys, np.array(["ct", "xray", "ct"]))
    assert index.lookup(np.array([b"k1", b"k2", b"zz", b"k3", b"a"], dtype="S32")).tolist() == \
        ["xray", "ct", "unknown", "ct", "unknown"]
    assert KeyModality(keys[:0], np.array([], dtype=str)).lookup(keys).tolist() == ["unknown"] * 3


def test_nearest_neighbours_by_blocks_equal_the_whole_similarity():
    rng = np.random.default_rng(6)
    for n, block in ((1300, 512), (7, 3)):
        a, b = rng.standard_normal((n, 5)), rng.standard_normal((n, 5))
        b[3] = b[1]  # a tie in every row: the first index wins, as np.argmax has it
        rows, cols = diagnostics._nearest(a, b, block)
        sim = a @ b.T
        assert np.array_equal(rows, sim.argmax(1)) and np.array_equal(cols, sim.argmax(0))
    same = np.ones((6, 2))
    assert diagnostics._nearest(same, same, 4)[1].tolist() == [0] * 6  # ties across blocks: the earlier block
