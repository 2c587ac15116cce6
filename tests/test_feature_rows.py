"""Scattered feature rows read with pread (features.rows): the same values as the arrays, a bounded set of open
files, a file replaced under a reader refused, and a reading process whose RSS holds batches, not shards (measured
in a child's VmHWM)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mmkd.features.checks import FeatureError
from mmkd.features.rows import RowReader
from mmkd.features.store import FeatureStore, write_shard


def _unit(norm_rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((norm_rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_equal_the_arrays_in_any_order_with_repeats_across_evictions(tmp_path, dtype):
    arrays = [_unit(300, 12, k).astype(dtype) for k in range(5)]
    for k, a in enumerate(arrays):
        np.save(tmp_path / f"f{k}.npy", a)
    reader = RowReader(max_open=2)  # five files through two descriptors
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(5))
        rows = rng.integers(0, 300, 40)
        rows[:5] = rows[5]  # a repeated row
        rows[10:20] = np.arange(100, 110)  # a run of consecutive rows: one read
        got = reader.read(str(tmp_path / f"f{k}.npy"), rows)
        assert got.dtype == np.float32 and np.array_equal(got, arrays[k][rows].astype(np.float32))
        assert len(reader._open) <= 2
    assert reader.read(str(tmp_path / "f0.npy"), []).shape == (0, 12)
    reader.close()
    assert not reader._open


def test_a_file_replaced_under_the_reader_is_refused_until_forgotten(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, _unit(50, 4, 0))
    reader = RowReader(max_open=1)
    reader.read(str(path), [1, 2])
    np.save(tmp_path / "other.npy", _unit(50, 4, 1))
    reader.read(str(tmp_path / "other.npy"), [0])  # evicts f.npy's descriptor
    new = _unit(50, 4, 2)
    np.save(tmp_path / "f.tmp.npy", new)
    (tmp_path / "f.tmp.npy").replace(path)  # a rewrite under the same name
    with pytest.raises(FeatureError, match=f"{path} changed while this process was reading"):
        reader.read(str(path), [1])
    reader.forget(str(path))
    assert np.array_equal(reader.read(str(path), [1]), new[[1]])


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, _unit(50, 4, 0))
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 40)
    with pytest.raises(FeatureError, match="truncated"):
        RowReader().read(str(path), [49])


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mmkd.features.store import FeatureStore

    def kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    store = FeatureStore(sys.argv[1])
    shard, row = store.locate("t", "v1", np.load(sys.argv[1] + "/keys.npy"))
    mapped = sys.argv[2] == "mapped"
    for s in np.unique(shard):  # opened and checked before the baseline (as training does before its loop)
        store.arrays(int(s)) if mapped else store.checked(int(s))
    base = kib("VmHWM")
    rng = np.random.default_rng(0)
    for _ in range(10):
        idx = np.sort(rng.choice(len(shard), 128, replace=False))
        if mapped:  # the former gather: fancy indexing of the shards' memory maps
            for s in np.unique(shard[idx]):
                img, txt = store.arrays(int(s))
                sel = idx[shard[idx] == s]
                img[row[sel]], txt[row[sel]]
        else:
            store.gather(shard[idx], row[idx], 256)
    print(json.dumps({"grew_kib": kib("VmHWM") - base}))
""")


def test_random_batches_hold_rows_not_shards(tmp_path):
    """Ten random batches of 128 rows from a 64 MiB store: the reading process's peak RSS grows by under 8 MiB, where
    the same reads through the memory maps grow it by more than 32 MiB (the kernel maps the pages around each
    fault: whole shards)."""
    root = tmp_path / "store"
    store = FeatureStore(root, create=True)
    store.register_set("t", "v1", 256, "float32")
    keys = []
    for u in range(4):  # 4 shards x 8192 rows x 256 float32 x (image + text) = 64 MiB
        k = np.array([f"{u:02d}{i:030x}" for i in range(8192)], dtype="S32")
        write_shard(root, "t", "v1", f"u{u}", k, _unit(8192, 256, 2 * u), _unit(8192, 256, 2 * u + 1), 256, "float32")
        store.commit("t", "v1", f"u{u}")
        keys.append(k)
    store.close()
    np.save(root / "keys.npy", np.concatenate(keys))

    def grew(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(root), how], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["grew_kib"]

    pread, mapped = grew("pread"), grew("mapped")
    assert pread < 8 * 1024, f"pread: peak RSS grew {pread} KiB"
    assert mapped > 32 * 1024, f"maps: peak RSS grew only {mapped} KiB (the comparison would not show anything)"
