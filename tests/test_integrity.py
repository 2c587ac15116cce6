"""Integrity tests: feature-shard checksums (flipped bytes, truncation, keys vs index) on open and in `mmkd verify`,
the index migration, stale state temp files, and resume fingerprints on the data's content."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmkd.features.store import FeatureError, FeatureStore, write_shard
from mmkd.training import checkpoint

DIM = 8


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_store(root: Path, units: int = 2, n: int = 6) -> FeatureStore:
    """A store of one feature set, `units` committed shards of n rows each."""
    store = FeatureStore(root, create=True)
    store.register_set("rad", "v1", DIM, "float32")
    for u in range(units):
        keys = np.array([f"{u:02d}{i:030x}" for i in range(n)], dtype="S32")
        write_shard(root, "rad", "v1", f"u{u}", keys, unit_rows(n, u), unit_rows(n, 10 + u), DIM, "float32")
        store.commit("rad", "v1", f"u{u}")
    return store


def shard_file(root: Path, unit: str, kind: str) -> Path:
    return root / "shards" / "rad" / "v1" / f"{unit}.{kind}.npy"


def flip_byte(path: Path, from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x40
    path.write_bytes(bytes(data))


def read_all(root: Path) -> None:
    store = FeatureStore(root)
    try:
        for (sid,) in store.db.execute("SELECT id FROM shards").fetchall():
            store.arrays(sid)
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["image", "text"])
def test_a_flipped_byte_is_refused_on_open_and_by_verify_naming_the_shard(tmp_path, kind):
    build_store(tmp_path).close()
    read_all(tmp_path)  # sound: opens (and this process remembers it hashed these bytes)
    bad = shard_file(tmp_path, "u1", kind)
    flip_byte(bad)
    with pytest.raises(FeatureError, match=rf"{bad}: sha256 .* differs from the index's"):
        read_all(tmp_path)
    store = FeatureStore(tmp_path)
    problems = store.verify()
    assert len(problems) == 1 and str(bad) in problems[0]
    # the sound shard still reads: one bad shard costs its rows, not the store
    shard, row = store.locate("rad", "v1", np.array([f"00{0:030x}"], dtype="S32"))
    assert np.allclose(store.gather(shard, row, DIM)[0], unit_rows(6, 0)[:1])


def test_a_truncated_shard_and_a_bad_header_are_refused_naming_the_file(tmp_path):
    build_store(tmp_path).close()
    bad = shard_file(tmp_path, "u0", "text")
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(FeatureError, match=rf"{bad}: \d+ bytes, the index recorded \d+ \(truncated"):
        read_all(tmp_path)
    head = shard_file(tmp_path, "u1", "image")
    data = head.read_bytes()
    head.write_bytes(b"garbage!" + data[8:])  # same size, broken magic
    problems = FeatureStore(tmp_path).verify()
    assert [p.split(":")[0] for p in problems] == [str(bad), str(head)]
    assert "unreadable .npy header" in problems[1]


def test_keys_are_checked_against_the_index_rows(tmp_path):
    build_store(tmp_path).close()
    keys_file = shard_file(tmp_path, "u0", "keys")
    keys = np.load(keys_file)
    np.save(keys_file, keys[::-1])  # same length, same header, other order: features would go to other samples
    with pytest.raises(FeatureError, match=rf"{keys_file}: sha256"):
        read_all(tmp_path)
    np.save(keys_file, keys)
    read_all(tmp_path)
    store = FeatureStore(tmp_path)  # the key index itself disagrees: u0's rows shifted by one, a key of u1 gone
    index = store.index
    k, loc = (np.concatenate(x) for x in zip(*index._merged("rad", "v1", index.runs("rad", "v1"),
                                                             index.live("rad", "v1"))))
    u0 = loc[:, 0] == store.db.execute("SELECT id FROM shards WHERE unit = 'u0'").fetchone()[0]
    loc[u0, 1] = (loc[u0, 1] + 1) % 6
    keep = k != bytes.fromhex(f"01{3:030x}")
    with store.db:
        store.db.execute("DELETE FROM runs")
        index._write("rad", "v1", 0, [(k[keep], loc[keep])])
    store.close()
    problems = FeatureStore(tmp_path).verify()
    assert any(f"{keys_file}: 6 of its 6 keys are not at their row in the key index" in p for p in problems)
    assert any(f"{shard_file(tmp_path, 'u1', 'keys')}: 1 of its 6 keys are not at their row" in p for p in problems)
    store = FeatureStore(tmp_path)
    with pytest.raises(FeatureError, match=rf"{keys_file}: 6 of the 6 keys .* not at their row"):
        store.locate("rad", "v1", keys)
    assert store.reindex_damaged() == ["rad@v1"] and store.verify() == []
    assert (store.locate("rad", "v1", keys)[1] == np.arange(6)).all()


def test_an_uncommitted_shard_is_adopted_only_if_its_bytes_match_what_was_written(tmp_path):
    store = build_store(tmp_path, units=1)
    keys = np.array([f"ff{i:030x}" for i in range(4)], dtype="S32")
    for unit in ("good", "bad"):  # whole shards a killed run wrote but did not commit
        write_shard(tmp_path, "rad", "v1", unit, keys if unit == "good" else np.char.replace(keys, b"ff", b"ee"),
                    unit_rows(4, 5), unit_rows(4, 6), DIM, "float32")
    bad = tmp_path / "shards" / "rad" / "v1" / "bad.image.npy"
    flip_byte(bad)
    assert store.adopt() == {"adopted_shards": 1, "removed_partial_files": 0, "discarded_shards": 1}
    assert not list(bad.parent.glob("bad.*")) and store.verify() == []
    assert (store.locate("rad", "v1", keys)[0] >= 0).all()


def test_the_feature_sets_digest_follows_the_features(tmp_path):
    """What distill's resume fingerprint holds of each feature set it reads: rewritten features change it."""
    store = build_store(tmp_path, units=1)
    before = store.set_digest("rad", "v1")
    assert FeatureStore(tmp_path).set_digest("rad", "v1") == before
    store.drop_shard(1)
    keys = np.array([f"00{i:030x}" for i in range(6)], dtype="S32")
    write_shard(tmp_path, "rad", "v1", "u0", keys, unit_rows(6, 0), unit_rows(6, 99), DIM, "float32")
    store.commit("rad", "v1", "u0")
    assert store.set_digest("rad", "v1") != before


def test_an_index_without_checksums_is_migrated_and_its_shards_are_then_checked(tmp_path):
    build_store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "index.sqlite")  # the schema before checksums: no sums column, no sums files
    with db:
        db.execute("ALTER TABLE shards DROP COLUMN sums")
    db.close()
    for f in (tmp_path / "shards").rglob("*.sums.json"):
        f.unlink()
    u1 = shard_file(tmp_path, "u1", "image")
    u1.write_bytes(u1.read_bytes()[:-4] + np.float32(np.nan).tobytes())  # u1 was damaged before the upgrade
    store = FeatureStore(tmp_path)
    sums = dict(store.db.execute("SELECT unit, sums FROM shards"))
    assert json.loads(sums["u0"])["image"]["bytes"] > 0 and sums["u1"] is None
    u1_prefix = tmp_path / "shards" / "rad" / "v1" / "u1"
    assert store.verify() == [f"{u1_prefix}.*.npy: no checksum in the index ({u1}: non-finite values)"]
    flip_byte(shard_file(tmp_path, "u0", "text"))  # after the migration, u0 is protected like a new shard
    assert str(shard_file(tmp_path, "u0", "text")) in FeatureStore(tmp_path).verify()[0]


def test_mmkd_verify_exit_codes_and_repair(workspace):
    from mmkd.cli import app
    from mmkd.config import Workspace, load_params

    ws = Workspace(workspace, load_params(workspace / "params.yaml"))
    build_store(ws.teacher_features).close()
    build_store(ws.aligned_features, units=1).close()
    good = CliRunner().invoke(app, ["verify", "--root", str(workspace)])
    assert good.exit_code == 0, good.output
    assert "verify: ok" in good.output and f"checked {ws.teacher_features}: 2 shards, 12 rows" in good.output
    bad = shard_file(ws.aligned_features, "u0", "image")
    flip_byte(bad)
    # once as a real process: the exit status a scheduler or a shell script sees
    proc = subprocess.run([sys.executable, "-m", "mmkd.cli", "verify", "--root", str(workspace)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and problems[0].startswith(f"PROBLEM {bad}: sha256 ")
    assert "verify: 1 problem(s)" in proc.stderr
    repaired = CliRunner().invoke(app, ["verify", "--root", str(workspace), "--repair"])
    assert repaired.exit_code == 1 and "dropped damaged shard rad@v1/u0; re-run align" in repaired.output
    after = CliRunner().invoke(app, ["verify", "--root", str(workspace)])
    assert after.exit_code == 0 and not bad.exists()


def test_stale_state_temp_files_are_removed_at_the_next_save_or_load(tmp_path):
    child = os.fork()
    if child == 0:  # a process that dies mid-save: its temp file stays behind
        checkpoint.atomic.temp_path(tmp_path / checkpoint.STATE_FILE).write_bytes(b"half a state")
        os._exit(0)
    os.waitpid(child, 0)
    live = tmp_path / f".{checkpoint.STATE_FILE}.{os.getppid()}.tmp"  # a live process's save under way: kept
    live.write_bytes(b"in progress")
    dead = tmp_path / f".{checkpoint.STATE_FILE}.{child}.tmp"
    assert dead.exists()
    assert checkpoint.load_state(tmp_path) is None and not dead.exists() and live.exists()
    dead.write_bytes(b"again")
    checkpoint.save_state(tmp_path, {"step": 1})
    assert not dead.exists() and checkpoint.load_state(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, checkpoint.STATE_FILE])


def test_the_resume_fingerprint_follows_the_pixels(tmp_path):
    """Same captions, same config; other pixels (e.g. another DICOM window at curation) -> other curated keys ->
    the saved state is not resumed. The same pixels resume it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_script import tiny_pairs

    from mmkd.config import TrainCfg
    from mmkd.data.imaging import content_hash
    from mmkd.training.clip import train_clip

    images, captions = tiny_pairs(32)
    rewindowed = np.clip(images.astype(np.int16) * 2 - 128, 0, 255).astype(np.uint8)
    cfg = TrainCfg(epochs=1, batch_size=16, lr=1e-3, warmup_steps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state = tmp_path / "state"

    def run(imgs) -> dict:
        return train_clip("mmkd-student-tiny", imgs, captions, cfg, 7, torch.device("cpu"), tmp_path / "model",
                          "tiny", state_dir=state, keys=[content_hash(im) for im in imgs])

    def unfinish() -> None:
        saved = torch.load(state / "state.pt", weights_only=True)
        saved["complete"] = False
        torch.save(saved, state / "state.pt")

    try:
        run(images)
        unfinish()
        assert run(images)["resumed_from_step"] == 2  # same data: continues (so the check below can fail)
        unfinish()
        assert "resumed_from_step" not in run(rewindowed)  # other pixels, same captions: starts over
    finally:
        torch.set_num_threads(threads)
