"""Shard-aware epoch order (each sample once, seeded, local, resumable); the prefetching reader (same bits)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mmkd.config import DistillCfg, TrainCfg
from mmkd.data.store import ShardImages, SplitImages
from mmkd.models.factory import create_model
from mmkd.training.loop import tokenize_all, train
from mmkd.training.objective import ClipObjective
from mmkd.training.order import epoch_order, row_shards, shard_order, weighted_order
from mmkd.training.prefetch import BatchReader
from mmkd.training.strategies import MeanObjective, ReferenceObjective
from mmkd.training.supervision import Supervision

MODEL = "mmkd-student-tiny"
WORDS = ["lesion", "normal", "opacity", "stone", "cyst", "mass", "effusion", "nodule"]


def layout(sizes: list[int], interleaved: bool = False, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)  # labels need not be 0..S-1
    return np.random.default_rng(seed).permutation(labels) if interleaved else labels


# ------------------------------------------------------------------ the order


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), window=st.integers(1, 6),
       buffer=st.integers(1, 64), seed=st.integers(0, 2**31), epoch=st.integers(0, 5), interleaved=st.booleans())
def test_every_sample_exactly_once_per_epoch(sizes, window, buffer, seed, epoch, interleaved):
    shard_of = layout(sizes, interleaved, seed)
    order = shard_order(shard_of, seed, epoch, window, buffer)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(len(shard_of)))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=10), window=st.integers(1, 4), seed=st.integers(0, 99))
def test_without_a_buffer_windows_are_whole_shards_read_in_storage_order(sizes, window, seed):
    shard_of = layout(sizes)
    order = shard_order(shard_of, seed, 0, window, buffer=1)
    _, first = np.unique(shard_of[order], return_index=True)
    opened = shard_of[order][np.sort(first)]  # shards in the order they are first read
    at = 0
    for w in range(0, len(opened), window):  # each window: `window` whole shards, read round-robin, then the next
        group = opened[w : w + window]
        size = int(np.isin(shard_of, group).sum())
        block = order[at : at + size]
        assert np.isin(shard_of[block], group).all()
        assert set(shard_of[block[: len(group)]].tolist()) == set(group.tolist())  # read together
        for g in group:  # a shard's rows keep their storage order: sequential reads
            assert np.array_equal(block[shard_of[block] == g], np.flatnonzero(shard_of == g))
        at += size
    assert at == len(order)


def test_the_buffer_bounds_how_far_a_row_moves():
    """A row leaves the buffer no earlier than `buffer - 1` rows before it was read: the order stays local."""
    shard_of = layout([50] * 8)
    reference = shard_order(shard_of, 5, 0, 2, buffer=1)  # the read stream itself (same shard permutation)
    read_at = np.empty(len(reference), np.int64)
    read_at[reference] = np.arange(len(reference))
    for buffer in (4, 32):
        order = shard_order(shard_of, 5, 0, 2, buffer)
        assert (read_at[order] <= np.arange(len(order)) + buffer - 1).all()
        assert not np.array_equal(order, reference)


def test_seeded_and_a_new_order_every_epoch():
    shard_of = layout([40] * 10)
    a = shard_order(shard_of, 1, 0, 3, 16)
    assert np.array_equal(a, shard_order(shard_of, 1, 0, 3, 16))
    assert not np.array_equal(a, shard_order(shard_of, 2, 0, 3, 16))
    assert not np.array_equal(a, shard_order(shard_of, 1, 1, 3, 16))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    epoch_order("shards", len(shard_of), gen, 1, 0, shard_of, 3, 16)
    assert torch.equal(gen.get_state(), state)  # draws nothing from the loop's generator
    assert torch.equal(epoch_order("global", 12, torch.Generator().manual_seed(4), 1, 0, None, 3, 16),
                       torch.randperm(12, generator=torch.Generator().manual_seed(4)))  # the historical stream


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(weights=st.lists(st.floats(0.0, 8.0), min_size=1, max_size=200).filter(lambda w: sum(w) > 1e-3),
       seed=st.integers(0, 2**31))
def test_weighted_order_draws_each_row_within_one_of_its_expectation(weights, seed):
    """sampling_focus's epoch: as many rows as the split, row i floor(w_i) or ceil(w_i) times (w scaled to mean 1),
    seeded by the loop's generator alone."""
    w = np.asarray(weights)
    order = weighted_order(w, torch.Generator().manual_seed(seed)).numpy()
    assert order.dtype == np.int64 and len(order) == len(w)
    expected = w * len(w) / w.sum()
    counts = np.bincount(order, minlength=len(w))
    assert np.all(counts >= np.floor(expected - 1e-9)) and np.all(counts <= np.ceil(expected + 1e-9))
    assert np.array_equal(order, weighted_order(w, torch.Generator().manual_seed(seed)).numpy())


def test_weighted_order_repeats_the_weighted_modality_and_keeps_the_epoch_length():
    w = np.array([3.0] * 10 + [0.5] * 40)  # mean 1: a modality of 10 rows drawn 3 times, one of 40 half as often
    gen = torch.Generator().manual_seed(1)
    order = epoch_order("global", 50, gen, 0, 0, None, 4, 8, w).numpy()
    counts = np.bincount(order, minlength=50)
    assert len(order) == 50 and np.all(counts[:10] == 3) and counts[10:].sum() == 20
    assert np.all(counts[10:] <= 1)
    with pytest.raises(ValueError, match="weighted sampling needs train.shuffle: global"):
        epoch_order("shards", 50, gen, 0, 0, np.zeros(50), 4, 8, w)
    with pytest.raises(ValueError, match="3 sample weights for 50"):
        epoch_order("global", 50, gen, 0, 0, None, 4, 8, w[:3])
    with pytest.raises(ValueError, match="finite, non-negative"):
        weighted_order(np.array([1.0, -1.0]), gen)
    with pytest.raises(ValidationError, match="distill.sampling_focus"):
        DistillCfg(sampling_focus=1.0, train=TrainCfg(shuffle="shards"))


def test_bad_order_settings_are_named():
    with pytest.raises(ValueError, match="shuffle_buffer"):
        shard_order(np.zeros(4), 0, 0, 1, 0)
    with pytest.raises(ValueError, match="shard layout has 3 rows for 4"):
        epoch_order("shards", 4, torch.Generator(), 0, 0, np.zeros(3), 1, 1)
    with pytest.raises(ValidationError, match="shuffle"):
        TrainCfg(shuffle="random")
    with pytest.raises(ValidationError, match="prefetch"):
        TrainCfg(prefetch=-1)
    assert TrainCfg().shuffle == "global"


def test_row_shards_follow_the_stores_views(tmp_path):
    parts = [np.zeros((n, 2, 2, 3), np.uint8) for n in (3, 1, 4)]
    views = SplitImages(parts)
    assert row_shards(views).tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert row_shards(views.subset([7, 0, 3])).tolist() == [2, 0, 1]
    assert row_shards(np.zeros((5, 2, 2, 3))).tolist() == [0] * 5  # in memory: one shard
    (tmp_path / "shards").mkdir()
    names = ("train-00001", "train-00001", "train-00000", "train-00002")
    for name in set(names):
        (tmp_path / "shards" / f"{name}.tar").touch()
    tars = ShardImages(tmp_path, [{"shard": name} for name in names], 8)  # one part; rows from three tars
    assert row_shards(tars).tolist() == [1, 1, 0, 2]


# ------------------------------------------------------------------ the reader


def test_reader_yields_the_same_batches_and_reraises_errors():
    for depth in (0, 1, 2):
        with BatchReader(lambda i: i * i, range(6), depth) as reader:
            assert list(reader) == [0, 1, 4, 9, 16, 25]

    def broken(i):
        if i == 3:
            raise OSError("shard 3 unreadable")
        return i

    for depth in (0, 2):
        got = []
        with pytest.raises(OSError, match="shard 3"):
            with BatchReader(broken, range(6), depth) as reader:
                got.extend(reader)
        assert got == [0, 1, 2]
    assert not _reader_threads()


def test_a_consumer_that_stops_early_leaves_no_thread():
    started = threading.Event()

    def slow(i):
        started.set()
        time.sleep(0.01)
        return i

    with pytest.raises(KeyboardInterrupt):
        with BatchReader(slow, range(10_000), 2) as reader:
            next(reader)
            raise KeyboardInterrupt
    assert started.is_set() and not _reader_threads()


def test_a_killed_process_does_not_wait_for_a_blocked_read():
    code = ("import threading, sys; from mmkd.training.prefetch import BatchReader\n"
            "r = BatchReader(lambda i: threading.Event().wait(), range(3), 1)\n"
            "print('started', flush=True); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "started" in proc.stdout  # exits although its reader blocks forever


def _reader_threads():
    return [t for t in threading.enumerate() if t.name == "mmkd-batch-reader" and t.is_alive()]


# ------------------------------------------------------------------ the loop with both


def store(n: int = 48, sizes=(10, 14, 8, 16), seed: int = 0) -> tuple[SplitImages, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    parts = np.split(images, np.cumsum(sizes)[:-1])
    return SplitImages(parts), [" ".join(rng.choice(WORDS, 4)) for _ in range(n)]


def run(cfg: TrainCfg, objective=None, state_dir=None, stop_at: int | None = None, on_log=None, weights=None):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, captions = store()
    model = create_model(MODEL)
    tokens = tokenize_all(open_clip.get_tokenizer(MODEL), captions)
    logged = []

    def log(metrics, step):
        logged.append(metrics)
        if on_log:
            on_log(step)
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt("stopped")

    history = train(model, images, tokens, cfg, objective or ClipObjective(), 7, torch.device("cpu"), "t", log,
                    state_dir, sample_weights=weights)
    return model.state_dict(), history, logged


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BASE = dict(epochs=2, batch_size=12, lr=1e-3, warmup_steps=1, shuffle="shards", shuffle_shards=2, shuffle_buffer=8)


def test_prefetch_gives_the_synchronous_losses_to_the_bit():
    sync_w, sync_h, sync_log = run(TrainCfg(**BASE, prefetch=0))
    ahead_w, ahead_h, ahead_log = run(TrainCfg(**BASE, prefetch=2))
    assert [m["loss"] for m in sync_log] == [m["loss"] for m in ahead_log] and len(sync_log) == 8
    assert same_weights(sync_w, ahead_w)
    for h, logged in ((sync_h, sync_log), (ahead_h, ahead_log)):
        assert 0 < h["data_wait_fraction"] < 1
        assert all(0 <= m["data_wait_fraction"] <= 1 for m in logged)
    global_w, _, _ = run(TrainCfg(**{**BASE, "shuffle": "global"}, prefetch=0))
    assert not same_weights(sync_w, global_w)  # the order is not ignored


def features(n: int, names=("a", "b"), dim: int = 128, seed: int = 1):
    from tests.test_strategies import Arrays  # the in-memory TeacherFeatures the strategy tests use

    rng = np.random.default_rng(seed)
    norm = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    avail = rng.random((n, len(names))) < 0.7
    avail[~avail.any(1), 0] = True
    feats = Arrays(list(names), [norm(rng.normal(size=(n, dim))) for _ in names],
                   [norm(rng.normal(size=(n, dim))) for _ in names], avail)
    return Supervision(list(names), avail, aligned=feats)


@pytest.mark.parametrize("kind", [ReferenceObjective, MeanObjective])
def test_stage2_teacher_features_read_ahead_give_the_same_bits(kind):
    cfg = DistillCfg(train=TrainCfg(**BASE, prefetch=0))
    sync_w, sync_h, sync_log = run(cfg.train, kind(features(48), cfg, 3))
    ahead = cfg.train.model_copy(update={"prefetch": 2})
    ahead_w, ahead_h, ahead_log = run(ahead, kind(features(48), cfg, 3))
    assert [m["loss"] for m in sync_log] == [m["loss"] for m in ahead_log]
    assert same_weights(sync_w, ahead_w)
    assert {k: v for k, v in sync_h.items() if k.startswith("teacher_share")} == \
           {k: v for k, v in ahead_h.items() if k.startswith("teacher_share")}


class Counting(ClipObjective):
    """Counts the batches the loop's reader has fetched."""

    fetched = 0

    def fetch(self, idx):
        self.fetched += 1
        return None


class CountingReference(ReferenceObjective):
    fetched = 0

    def fetch(self, idx):
        self.fetched += 1
        return super().fetch(idx)


@pytest.mark.parametrize("stage", ["clip", "reference"])
def test_stopped_and_resumed_equals_uninterrupted(stage, tmp_path):
    """Stopped by an exception at step 3 (the state saved at step 2, while the reader had read steps 3 and 4
    ahead, drawing their teachers), resumed: the weights of one uninterrupted run, and no reader thread left."""
    cfg = TrainCfg(**BASE, prefetch=2, checkpoint_every=2)
    make = (lambda: Counting()) if stage == "clip" else (
        lambda: CountingReference(features(48), DistillCfg(train=cfg), 3))
    whole, _, _ = run(cfg, make())
    objective = make()

    def read_ahead(step):  # before the loop saves step 2's state, let the reader fill its queue
        deadline = time.time() + 30
        while step == 2 and objective.fetched < 4 and time.time() < deadline:
            time.sleep(0.005)

    with pytest.raises(KeyboardInterrupt):
        run(cfg, objective, tmp_path, stop_at=3, on_log=read_ahead)
    assert objective.fetched == 4 and not _reader_threads()
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    resumed, history, _ = run(cfg, make(), tmp_path)
    assert history["resumed_from_step"] == 2 and history["steps"] == 8
    assert same_weights(whole, resumed)


def test_a_weighted_epoch_order_resumes_exactly(tmp_path):
    """sampling_focus's epochs: stopped at step 3 (state saved at step 2) and resumed, the weights equal one
    uninterrupted weighted run's; the weights change what is trained (not the unweighted run's weights)."""
    cfg = TrainCfg(**{**BASE, "shuffle": "global"}, prefetch=2, checkpoint_every=2)
    n = len(store()[0])
    weights = np.where(np.arange(n) % 3 == 0, 2.5, 0.25)  # a third of the rows drawn ten times as often
    whole, _, _ = run(cfg, weights=weights)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, state_dir=tmp_path, stop_at=3, weights=weights)
    resumed, history, _ = run(cfg, state_dir=tmp_path, weights=weights)
    assert history["resumed_from_step"] == 2 and same_weights(whole, resumed)
    assert not same_weights(whole, run(cfg)[0])


def test_stage2_reads_a_real_feature_store_from_the_reader_thread(tmp_path):
    """TeacherFeatures over an on-disk FeatureStore (SQLite index, checked memory-mapped shards), read ahead."""
    from mmkd.features.store import FeatureStore, TeacherFeatures, write_shard

    n, dim, names = 48, 128, ["a", "b"]
    rng = np.random.default_rng(2)
    keys = np.array([f"{i:032x}" for i in range(n)], dtype="S32")
    store = FeatureStore(tmp_path / "aligned", create=True)
    for t in names:
        store.register_set(t, "v1", dim, "float32")
        for start in range(0, n, 16):  # three shards per teacher
            rows = rng.normal(size=(2, 16, dim)).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
            write_shard(tmp_path / "aligned", t, "v1", f"u{start:04d}", keys[start : start + 16], rows[0], rows[1],
                        dim, "float32")
            store.commit(t, "v1", f"u{start:04d}")
    store.close()
    results = []
    for prefetch in (0, 2):
        store = FeatureStore(tmp_path / "aligned")  # opened here, as distill() opens it: no shard mapped yet
        cfg = DistillCfg(train=TrainCfg(**BASE, prefetch=prefetch))
        feats = TeacherFeatures(store, [(t, "v1") for t in names], keys)
        sup = Supervision(names, feats.available, aligned=feats)
        results.append(run(cfg.train, MeanObjective(sup, cfg, 3)))
        store.close()
    assert [m["loss"] for m in results[0][2]] == [m["loss"] for m in results[1][2]]
    assert same_weights(results[0][0], results[1][0])
