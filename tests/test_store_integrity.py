"""The curated store's integrity: checksums written with the bytes, verify_store naming each damaged file, the
cheap checks on open, generations (hard-linked reuse, a rebuild equal to a fresh run, the fallback switch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data import checksums, generation
from mmkd.data.curate import curate
from mmkd.data.imaging import square_view
from mmkd.data.store import CurationError, load_curated, verify_store


def _cfg() -> CurateCfg:
    """durable=False: no fsync, which changes nothing tested here (tests/test_curate.py runs with it on)."""
    return CurateCfg(workers=0, sources=[SourceCfg(name="s", kind="manifest", path="pairs.jsonl")],
                     decoded_sizes=[16, 24], shard_max_records=5, durable=False)


def _source(root: Path, n: int = 20) -> list[dict]:
    rows = []
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "caption": f"an axial CT slice number {i}",
                     "split": {0: "test", 1: "probe"}.get(i % 5, "train")})
    _write(root, rows)
    return rows


def _write(root: Path, rows: list[dict]) -> None:
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def store(tmp_path) -> tuple[Path, Path, list[dict]]:
    src = tmp_path / "src"
    src.mkdir()
    rows = _source(src)
    curate(src, tmp_path / "curated", _cfg())
    return src, tmp_path / "curated", rows


def test_checksums_written_with_the_bytes_match_the_files(store):
    _, out, _ = store
    files = checksums.load(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {checksums.NAME}
    assert set(files) == on_disk                         # every file of the generation, shards and metadata
    for rel, want in files.items():
        got = checksums.file_entry(out / rel, want.get("rows"))
        assert got == want, rel                          # hashed while written == hashed from disk
    assert verify_store(out) == []


def test_verify_store_names_every_damaged_file(store, tmp_path):
    _, out, _ = store
    files = checksums.load(out)
    tar = out / "shards" / "train-00000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF                                    # same size, one byte flipped
    tar.write_bytes(bytes(data))
    view = out / "decoded" / "16" / "train-00001.npy"
    view.write_bytes(view.read_bytes()[:-10])            # truncated
    (out / "thumbs" / "test-00000.npy").unlink()         # missing
    (out / "shards" / "stray.tar").write_bytes(b"x")     # unlisted
    problems = "\n".join(verify_store(out))
    assert "shards/train-00000.tar: checksum mismatch" in problems
    assert f"decoded/16/train-00001.npy: size mismatch: {files['decoded/16/train-00001.npy']['size'] - 10}" in problems
    assert "thumbs/test-00000.npy is missing" in problems
    assert "shards/stray.tar: not listed in checksums.json" in problems
    assert len(verify_store(out)) == 4                   # nothing else is blamed

    # manifest rows past a shard, and decoded rows that disagree with the manifest (checksums made to agree)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["row"] = 99
    lines[0] = json.dumps(first, sort_keys=True)
    (out / "manifest.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    problems = "\n".join(verify_store(out))
    assert f"manifest.jsonl:{len(lines)}: row 99 is past the" in problems and f"shards/{first['shard']}.tar" in problems
    assert "manifest.jsonl: checksum mismatch" in problems or "manifest.jsonl: size mismatch" in problems
    assert "shards/sizes.json does not match" not in problems   # the row moved, the count per shard did not


def test_decoded_rows_that_disagree_with_the_manifest_are_named(store):
    _, out, _ = store
    view = out / "decoded" / "24" / "probe-00000.npy"
    arr = np.load(view)
    np.save(view, arr[:-1])                              # a view with one row fewer, its checksums entry rewritten
    files = checksums.load(out)
    files["decoded/24/probe-00000.npy"] = checksums.file_entry(view, len(arr) - 1)
    (out / checksums.NAME).write_bytes(checksums.dump(files))
    problems = verify_store(out)
    assert any(f"decoded/24/probe-00000.npy: {len(arr) - 1} decoded rows, the manifest lists {len(arr)}" in p
               for p in problems), problems
    with pytest.raises(CurationError, match=f"shard probe-00000: decoded/24/probe-00000.npy holds {len(arr) - 1} rows"):
        load_curated(out, "probe", size=24)
    files["decoded/24/probe-00000.npy"]["rows"] = len(arr)       # checksums.json lying about the rows too
    (out / checksums.NAME).write_bytes(checksums.dump(files))
    with pytest.raises(CurationError, match=f"decoded/24/probe-00000.npy has {len(arr) - 1} rows, the manifest"):
        load_curated(out, "probe", size=24)


def test_open_checks_existence_sizes_and_rows_and_names_the_shard(store):
    _, out, _ = store
    assert len(load_curated(out, "train")[1]) > 0
    (out / "decoded" / "16" / "train-00001.npy").unlink()
    with pytest.raises(CurationError, match="shard train-00001: decoded/16/train-00001.npy is missing"):
        load_curated(out, "train")
    tar = out / "shards" / "test-00000.tar"
    tar.write_bytes(tar.read_bytes()[:-512])
    with pytest.raises(CurationError, match="shard test-00000: shards/test-00000.tar has .* bytes, checksums.json"):
        load_curated(out, "test", size=20)               # a size without views reads the shards
    assert len(load_curated(out, "test", size=16)[1]) > 0   # the views of that shard are whole
    man = out / "manifest.jsonl"
    man.write_text(man.read_text()[:-100])
    with pytest.raises(CurationError, match="manifest.jsonl: .* bytes, checksums.json says"):
        load_curated(out, "probe")


def test_a_damaged_store_is_curated_again_not_a_crash(store):
    """What the old in-place rebuild left when killed (a thumbnail file gone) made every later run crash."""
    src, out, _ = store
    (out / "thumbs" / "train-00000.npy").unlink()
    summary = curate(src, out, _cfg())
    assert summary["reused"] == 0 and summary["decoded"] == summary["input_records"]
    assert verify_store(out) == []
    (out / "quarantine.jsonl").unlink()                  # any unreadable part of the last run's record
    assert curate(src, out, _cfg())["reused"] == 0 and verify_store(out) == []


def test_incremental_run_links_kept_shards_and_a_rebuild_equals_a_fresh_run(store, tmp_path):
    src, out, rows = store
    inode = (out / "shards" / "train-00000.tar").stat().st_ino
    for i in range(20, 24):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(src / f"{i}.png")
    more = rows + [{"id": f"r{i}", "image": f"{i}.png", "caption": f"an axial CT slice number {i}"}
                   for i in range(20, 24)]
    _write(src, more)
    second = curate(src, out, _cfg())
    assert second["decoded"] == 4 and (out / "shards" / "train-00000.tar").stat().st_ino == inode   # not copied
    assert verify_store(out) == []
    _write(src, more[:3] + more[6:])                     # records removed: a rebuild, shards from 00000
    curate(src, out, _cfg())
    fresh = tmp_path / "fresh"
    curate(src, fresh, _cfg())
    assert _tree(out) == _tree(fresh)
    assert sorted(p.name for p in out.parent.iterdir() if "curated" in p.name) == ["curated"]


def test_fallback_switch_and_its_recovery(store, tmp_path, monkeypatch):
    """Where renameat2 cannot exchange, two renames switch; a kill between them leaves the old store readable
    (resolve) and the next run completes the switch."""
    src, out, rows = store
    old = _tree(out)
    monkeypatch.setattr(generation, "exchange", lambda a, b: False)
    _write(src, rows[:-2])
    curate(src, out, _cfg())
    new = _tree(out)
    assert new != old and verify_store(out) == []
    gens = generation.Generations(out)
    # the state a kill between the two renames leaves: no live store, the old one and the complete new one
    shutil.copytree(out, gens.next)
    shutil.rmtree(out)
    for rel, data in old.items():
        (gens.old / rel).parent.mkdir(parents=True, exist_ok=True)
        (gens.old / rel).write_bytes(data)
    assert generation.resolve(out) == gens.old and len(load_curated(out, "train")[0]) > 0   # readers: the old one
    assert verify_store(out) == []
    assert gens.recover() == ["switched in curated (completed the interrupted switch)", "removed .curated.old"]
    assert _tree(out) == new and not gens.old.exists() and not gens.next.exists()


def test_renameat2_exchange_swaps_two_directories(tmp_path):
    """The atomic switch this filesystem gives (ext4, tmpfs, xfs, btrfs, overlayfs all do)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "in-a").touch()
    (b / "in-b").touch()
    assert generation.exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["in-b"] and [p.name for p in b.iterdir()] == ["in-a"]
    with pytest.raises(FileNotFoundError):
        generation.exchange(a, tmp_path / "missing")


def test_curation_never_replaces_a_folder_that_is_not_a_store(store, tmp_path):
    src, _, _ = store
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CurationError, match="not a curated store"):
        curate(src, precious, _cfg())
    assert (precious / "notes.txt").read_text() == "keep me"


def test_an_open_reader_keeps_reading_its_generation_across_a_rebuild(store):
    """A rebuild reuses shard names for other records; images opened before it still read the records they had."""
    src, out, rows = store
    records, views = load_curated(out, "train")
    _, decoded = load_curated(out, "train", size=20)       # no view at 20: read from the shards, on demand
    want_views = views[:]
    _write(src, [r for r in rows if r["id"] not in ("r2", "r3")])   # train records: every train shard changes
    curate(src, out, _cfg())
    now = load_curated(out, "train")[0]
    assert (now[0]["shard"], now[0]["id"]) == (records[0]["shard"], "r4") and records[0]["id"] == "r2"
    assert np.array_equal(views[:], want_views)
    fresh_rgb = [np.asarray(Image.open(src / f"{r['id'][1:]}.png").convert("RGB")) for r in records]
    assert all(np.array_equal(decoded[i], square_view(rgb, 20)) for i, rgb in enumerate(fresh_rgb))
