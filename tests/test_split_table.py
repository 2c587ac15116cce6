"""SplitTable, the compact split reader of training and align: the same records as split_records in the same order,
captions read back by offset, the same images, a damaged manifest named, and memory that does not hold records
(measured in a child process's peak RSS)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.curate import curate
from mmkd.data.split_table import SplitTable, text_digest
from mmkd.data.splits import SPLITS
from mmkd.data.store import CurationError, open_images, split_records
from mmkd.training import checkpoint


def _cfg() -> CurateCfg:
    return CurateCfg(workers=0, sources=[SourceCfg(name="s", kind="manifest", path="pairs.jsonl")],
                     decoded_sizes=[16], shard_max_records=5, durable=False)


def _source(root: Path, n: int) -> None:
    rows = []
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "caption": f"case {i}: a {['small', 'large'][i % 2]} nodule",
                     "modality": ["ct", "xray", "mri"][i % 3], "labels": {"finding": ["nodule", "normal"][i % 2]},
                     "split": {0: "test", 1: "probe"}.get(i % 5, "train")})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def store(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    _source(src, 40)
    curate(src, tmp_path / "curated", _cfg())
    return tmp_path / "curated"


@pytest.mark.parametrize("split", SPLITS)
def test_the_table_holds_split_records_in_their_order(store, split):
    records, table = split_records(store, split), SplitTable(store, split)
    assert len(table) == len(records) > 0
    assert list(table.key_strings()) == [r["key"] for r in records]
    assert table.keys.dtype == np.dtype("S32")
    assert [table.shard_names[s] for s in table.shard] == [r["shard"] for r in records]
    assert table.row.tolist() == [r["row"] for r in records]
    assert table.modality_of().tolist() == [r["modality"] for r in records]
    assert [table[i] for i in range(len(table))] == records          # whole records, read back by offset
    assert table.field("id", [2, 0]) == [records[2]["id"], records[0]["id"]]
    assert table.findings() == [r["labels"]["finding"] for r in records]
    captions = table.captions()
    assert len(captions) == len(records)
    assert list(captions) == [r["caption"] for r in records] and captions[1:3] == [r["caption"] for r in records[1:3]]
    assert captions.digest() == hashlib.sha256("\n".join(r["caption"] for r in records).encode()).hexdigest()


def test_the_table_opens_the_same_images(store):
    records, table = split_records(store, "train"), SplitTable(store, "train")
    for size in (16, 12):  # a decoded view; decoded from the tar shards
        assert np.array_equal(open_images(store, table, size)[np.arange(len(table))],
                              open_images(store, records, size)[np.arange(len(records))])


def test_manifest_lines_out_of_shard_order_are_sorted_and_hashed_in_shard_order(store):
    path = store / "manifest.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(reversed(lines)))  # same size: the cheap check passes
    records, table = split_records(store, "train"), SplitTable(store, "train")
    assert list(table.key_strings()) == [r["key"] for r in records]
    assert table.caption_digest() == hashlib.sha256("\n".join(r["caption"] for r in records).encode()).hexdigest()


def test_a_broken_row_sequence_is_named(store):
    path = store / "manifest.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    victim = next(r for r in recs if r["split"] == "train" and r["row"] == 1)
    victim["row"] = 7
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    with pytest.raises(CurationError, match=f"shard {victim['shard']}: manifest row"):
        open_images(store, SplitTable(store, "train"), 16)


def test_a_key_too_long_names_the_record(store):
    path = store / "manifest.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    victim = next(r for r in recs if r["split"] == "train")
    victim["key"], victim["caption"] = victim["key"] + "ff", victim["caption"][:-2]  # same size: checks pass
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    with pytest.raises(CurationError, match=f"record '{victim['id']}'"):
        SplitTable(store, "train")


@pytest.mark.parametrize("damage", ["not json", "no caption", "row not a number"])
def test_a_damaged_manifest_line_is_named(store, damage):
    path = store / "manifest.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if json.loads(line)["split"] == "train")
    rec = json.loads(lines[victim])
    if damage == "no caption":
        del rec["caption"]
    elif damage == "row not a number":
        rec["row"] = "seven"
    bad = "{" + lines[victim][2:] if damage == "not json" else json.dumps(rec, sort_keys=True) + "\n"
    (store / "checksums.json").unlink()  # the size check would stop it first; this is the damage it cannot see
    path.write_text("".join(lines[:victim]) + bad + "".join(lines[victim + 1:]))
    with pytest.raises(CurationError, match=f"line {victim + 1} is not a curated record"):
        SplitTable(store, "train")


def test_a_table_keeps_reading_its_generation_after_a_new_one_is_switched_in(tmp_path, store):
    table = SplitTable(store, "train")
    before = list(table.captions())
    src = tmp_path / "src"
    _source(src, 60)
    recs = [json.loads(line) for line in (src / "pairs.jsonl").read_text().splitlines()]
    for r in recs:
        r["caption"] += " (revised)"
    (src / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    curate(src, store, _cfg())
    assert SplitTable(store, "train").captions()[0].endswith("(revised)")
    assert list(table.captions()) == before                          # the old manifest, still open


def test_streamed_digests_equal_the_joined_ones():
    texts = ["a", "", "b c", "d\ne"]
    for part in ([], texts[:1], texts):
        assert text_digest(iter(part)) == hashlib.sha256("\n".join(part).encode()).hexdigest()
        assert checkpoint.data_id(iter(part)) == hashlib.sha256("\n".join(part).encode()).hexdigest()[:16]


# VmHWM, not ru_maxrss: a child's ru_maxrss keeps its parent's (pytest's) peak across fork and exec
_CHILD = textwrap.dedent("""
    import json, sys
    from mmkd.data.split_table import SplitTable
    from mmkd.data.store import split_records

    def hwm_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

    root, how = sys.argv[1], sys.argv[2]
    SplitTable(root, "probe")  # imports and first allocations, before the baseline
    base = hwm_kib()
    held = SplitTable(root, "train") if how == "table" else split_records(root, "train")
    print(json.dumps({"grew_kib": hwm_kib() - base, "n": len(held)}))
""")


def test_memory_per_record_is_columns_not_records(tmp_path):
    """A child builds the table over a 60,000-record manifest: its peak RSS (VmHWM) grows by under 200 bytes a record,
    where split_records' dicts grow it by more than 5 times that (so the bound measures what it claims)."""
    n = 60_000
    base = {"ext": "png", "fingerprint": "f" * 32, "group": "g" * 20, "height": 64, "kind": "synthetic", "labels": {},
            "licence": "CC0-1.0", "modality": "ct", "modality_from": "source", "offset": 512, "orig_height": 64,
            "orig_width": 64, "phash": "8" * 16, "size": 8706, "source": "s", "split_from": "declared", "width": 64}
    with open(tmp_path / "manifest.jsonl", "w") as fh:
        for i in range(n + 10):
            split = "train" if i < n else "probe"
            fh.write(json.dumps({**base, "id": f"s{i:08d}", "key": f"{i:032x}", "caption": f"ct image {i}: a finding "
                                 f"in region {i % 97}, about {i % 50} mm", "line": i + 1, "origin": f"images/{i}.png",
                                 "row": i if split == "train" else i - n, "shard": f"{split}-00000", "split": split},
                                sort_keys=True) + "\n")

    def grew(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), how], capture_output=True, text=True,
                             check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["n"] == n
        return res["grew_kib"] * 1024

    table, records = grew("table"), grew("records")
    assert table < 200 * n, f"the table grew peak RSS by {table / n:.0f} bytes a record"
    assert records > 5 * 200 * n, f"split_records grew it by only {records / n:.0f} bytes a record"
