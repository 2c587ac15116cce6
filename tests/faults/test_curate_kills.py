"""Fault tests: curation SIGKILLed (a real signal, in a forked process) at seeded random points of a full rebuild
and of an incremental run; readers at the kill point see the old or the new store whole, and the next run completes.

Kill points are deterministic: the child counts curation's side effects (manifest line writes, shard rows,
view rows, fsyncs, links, unlinks, renames, the directory exchange) and kills itself at the k-th, with k drawn
from a seeded RNG over the number a clean run performs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.config import CurateCfg, SourceCfg
from mmkd.data import checksums, generation, store
from mmkd.data.curate import curate
from mmkd.data.imaging import content_hash, square_view
from mmkd.data.splits import SPLITS

SIZE = 16
N_IMAGES = 24
KILLS = {True: 8, False: 3}  # per scenario: kill points with the atomic exchange, with the two-rename fallback
TARGETS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "unlink"), (os, "rmdir"), (os, "fsync"),
           (generation, "exchange"), (store.ShardWriter, "add"), (store.NpyAppender, "append"),
           (checksums.HashedText, "write")]


class Events:
    """Counts curation's side effects; with `kill_at` (event number, or (name, nth)), the process SIGKILLs itself
    just before that event happens. exchange=False: renameat2 reports 'unsupported' (the fallback switch)."""

    def __init__(self, kill_at=None, exchange: bool = True):
        self.kill_at, self.exchange, self.count, self.seen, self.first = kill_at, exchange, 0, {}, {}

    def tick(self, name: str) -> None:
        self.count += 1
        self.seen[name] = self.seen.get(name, 0) + 1
        self.first.setdefault(name, self.count)
        if self.kill_at in (self.count, (name, self.seen[name])):
            os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(self, name, real):
        def hooked(*args, **kw):
            self.tick(name)
            if name == "exchange" and not self.exchange:
                return False
            return real(*args, **kw)
        return hooked

    def __enter__(self):
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in TARGETS]
        for owner, name, real in self.saved:
            setattr(owner, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc):
        for owner, name, real in self.saved:
            setattr(owner, name, real)


def _cfg(durable: bool = False) -> CurateCfg:
    """durable=False: no fsync (what a SIGKILL leaves does not depend on it: the page cache outlives the process;
    fsync is for power loss), so the many runs here cost no disk flushes; test_kill_mid_rebuild keeps it on."""
    return CurateCfg(workers=0, sources=[SourceCfg(name="s", kind="manifest", path="pairs.jsonl")],
                     decoded_sizes=[SIZE], shard_max_records=4, durable=durable)


def _source(root: Path) -> tuple[list[dict], dict[str, str]]:
    """N_IMAGES tiny RGB PNGs; their manifest rows and the content key of each id, from the source pixels."""
    rows, keys = [], {}
    for i in range(N_IMAGES):
        arr = np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"im{i}.png")
        rows.append({"id": f"r{i}", "image": f"im{i}.png", "caption": f"an axial CT slice number {i}"})
        keys[f"r{i}"] = content_hash(np.asarray(Image.open(root / f"im{i}.png").convert("RGB")))
    return rows, keys


def _write_rows(root: Path, rows: list[dict]) -> None:
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _check_reads(curated: Path, keys: dict[str, str]) -> set[str]:
    """Every manifest row reads its own image, from the shard and from the decoded view; returns the ids."""
    ids = set()
    for split in SPLITS:
        records, views = store.load_curated(curated, split)
        assert len(records) == len(views)
        for i, r in enumerate(records):
            with open(store.resolve(curated) / "shards" / f"{r['shard']}.tar", "rb") as fh:
                fh.seek(r["offset"])
                data = fh.read(r["size"])
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert content_hash(rgb) == r["key"] == keys[r["id"]], r["id"]
            assert np.array_equal(views[i], square_view(rgb, SIZE)), r["id"]
            ids.add(r["id"])
    return ids


def _killed_run(src: Path, curated: Path, events: Events, durable: bool = False) -> None:
    """curate() in a forked child that SIGKILLs itself at events.kill_at; asserts it really died of it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            with events:
                curate(src, curated, _cfg(durable))
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120  # a hang guard only (a child deadlocked on a lock a thread held at fork)
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the curating child {pid} hung until killed")
        time.sleep(0.002)
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-src")
    rows, keys = _source(root)
    return root, rows, keys


def _scenario(tmp: Path, source, before: list[dict], after: list[dict]):
    """The store curated from `before`, then the source changed to `after`; (old tree, new tree, per switch kind:
    the events of a clean run, and the event just after the switch began: the old generation being deleted after
    the exchange; with the fallback, between its two renames)."""
    root, _, _ = source
    _write_rows(root, before)
    base = tmp / "base" / "curated"
    curate(root, base, _cfg())
    _write_rows(root, after)
    counts = {}
    for exchange in (True, False):
        ref = tmp / f"ref-{exchange}" / "curated"
        shutil.copytree(base, ref)
        with Events(exchange=exchange) as ev:
            curate(root, ref, _cfg())
        counts[exchange] = ev.count, ev.first["exchange" if exchange else "rename"] + 1
    return base, _tree(base), _tree(ref), counts


@pytest.mark.parametrize("change", ["rebuild", "incremental"])
def test_kill_at_random_points_leaves_old_or_new_store_whole_and_next_run_completes(change, source, tmp_path):
    root, rows, keys = source
    before, after = (rows, rows[:10] + rows[13:]) if change == "rebuild" else (rows[:17], rows)
    base, old, new, counts = _scenario(tmp_path, source, before, after)
    assert old != new and any(r.endswith(".npy") for r in new)
    assert _check_reads(tmp_path / "ref-True" / "curated", keys) == {r["id"] for r in after}
    old_ids, new_ids = {r["id"] for r in before}, {r["id"] for r in after}
    rng = np.random.default_rng(20261206 + len(change))
    seen = set()
    for exchange, n_kills in KILLS.items():
        total, after_switch = counts[exchange]
        for k in sorted({*rng.choice(np.arange(1, total + 1), n_kills, replace=False), after_switch}):
            ws = tmp_path / f"kill-{exchange}-{k}" / "curated"
            shutil.copytree(base, ws)
            _killed_run(root, ws, Events(int(k), exchange))
            live = store.resolve(ws)           # what a reader opens before any recovery
            at_kill = _tree(live)
            which = "old" if at_kill == old else "new" if at_kill == new else None
            assert which, f"kill at event {k}: neither generation; differs from the old in " \
                          f"{sorted(r for r in set(at_kill) | set(old) if at_kill.get(r) != old.get(r))[:8]}"
            assert store.verify_store(ws) == []
            assert _check_reads(ws, keys) == (old_ids if which == "old" else new_ids)
            seen.add(which)
            curate(root, ws, _cfg())           # the next run recovers and completes
            assert _tree(ws) == new, f"kill at event {k}: the run after it left a different store"
            assert sorted(p.name for p in ws.parent.iterdir()) == ["curated"]   # no leftover generation
    assert seen == {"old", "new"}                # the kill points fell on both sides of the switch


def test_kill_mid_rebuild_leaves_the_old_store_readable(source, tmp_path):
    root, rows, keys = source
    base, old, _, _ = _scenario(tmp_path, source, rows, rows[3:])
    for kill_at in (("add", 1), ("append", 30), ("exchange", 1)):
        ws = tmp_path / f"kill-{kill_at[0]}-{kill_at[1]}" / "curated"
        shutil.copytree(base, ws)
        _killed_run(root, ws, Events(kill_at), durable=True)
        assert _tree(ws) == old                 # readers see the previous generation, byte for byte
        assert _check_reads(ws, keys) == {r["id"] for r in rows}
        assert (ws.parent / ".curated.next").is_dir()   # the abandoned generation, until the next run
