"""Inbox ingestion killed by a real SIGKILL at seeded points: the next run completes it; every row once, images in.

A forked child ingests a 1000-row drop under the workspace lock, counting its file events (each file copied,
each rename, each fsync, the archiving move) and killing itself with SIGKILL at the k-th; the parent then runs the
inbox as the flow does (pending drops, ingest, under the lock) and checks the inbox source. The drop is planned
once, as the flow's planning task is cached by the drop's file state.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from mmkd.data import inbox as inbox_mod
from mmkd.data.inbox import ingest_drop, pending_drops, plan_drop
from mmkd.workspace_lock import workspace_lock

N_ROWS = 1000
SEED = 20261206
COPY_POINTS = 13  # seeded kill points among the file copies, plus every event after the last copy


def _tiny_png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Path]:
    # ~20 000 small files are created: on tmpfs where there is one (a SIGKILL tests the process, not the disk;
    # rename is atomic on both), else in pytest's temp folder
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="mmkd-inbox-kills-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path_factory.mktemp("inbox-kills")
    drop = root / "inbox" / "big-drop"
    (drop / "img").mkdir(parents=True)
    rows = []
    for i in range(N_ROWS):
        name = f"img/{i:04d}.png"
        (drop / name).write_bytes(_tiny_png(i))
        rows.append(json.dumps({"id": f"big-{i:04d}", "image": name, "caption": f"a tiny chest x-ray number {i}",
                                "modality": "xray"}))
    (drop / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _paths(root: Path) -> tuple[Path, Path, Path]:
    return root / "inbox", root / "data" / "inbox" / "manifest.jsonl", root / "inbox" / "processed"


def _run_inbox(root: Path, plan) -> list[dict]:
    """What the inbox flow does, without Prefect: every complete drop ingested, under the workspace lock."""
    inbox, manifest, processed = _paths(root)
    with workspace_lock(root, wait_s=0, command="test inbox run") as how:
        assert how == "acquired"
        return [ingest_drop(plan, manifest, processed) for d in pending_drops(inbox)[0]]


def _child_ingest(root: Path, plan, kill_at: int | None, events_file: Path) -> None:
    """In a forked child: ingest under the lock, SIGKILL at the kill_at-th file event (None: record them all)."""
    events: list[str] = []

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            events.append(kind)
            if kill_at is not None and len(events) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    code = 0
    try:
        inbox_mod._copy_file = counted("copy", inbox_mod._copy_file)
        os.rename = counted("rename", os.rename)
        os.replace = counted("replace", os.replace)
        os.fsync = counted("fsync", os.fsync)
        shutil.move = counted("move", shutil.move)
        _run_inbox(root, plan)
        events_file.write_text(json.dumps(events))
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        events_file.write_text("ERROR " + traceback.format_exc())
        code = 1
    finally:
        os._exit(code)


def _fork_ingest(root: Path, plan, kill_at: int | None, events_file: Path) -> int:
    pid = os.fork()
    if pid == 0:
        _child_ingest(root, plan, kill_at, events_file)
    _, status = os.waitpid(pid, 0)
    return status


def _check(root: Path) -> None:
    """Exactly the drop's rows, each once, each parsing, each image present; no leftovers; the drop archived."""
    inbox, manifest, processed = _paths(root)
    lines = manifest.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the manifest ends with a newline"
    rows = [json.loads(line) for line in lines[:-1]]  # a torn line would fail here
    ids = [r["id"] for r in rows]
    assert len(ids) == N_ROWS and set(ids) == {f"big-{i:04d}" for i in range(N_ROWS)}
    base = manifest.parent
    assert all((base / r["image"]).is_file() for r in rows)
    assert {r["inbox_drop"] for r in rows} == {p.name for p in processed.iterdir()}
    assert not (inbox / "big-drop").exists()
    leftovers = [p.name for p in base.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def _reset(root: Path) -> None:
    inbox, manifest, processed = _paths(root)
    shutil.rmtree(manifest.parent)
    (done,) = processed.iterdir()
    done.rename(inbox / "big-drop")


def test_sigkill_at_seeded_points_of_ingestion_then_a_run_completes_it(workspace, tmp_path):
    root = workspace
    plan = plan_drop(root / "inbox" / "big-drop")
    # a full run in a child records the event sequence (and checks that an uninterrupted ingestion is whole)
    status = _fork_ingest(root, plan, None, tmp_path / "events.json")
    text = (tmp_path / "events.json").read_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
    events = json.loads(text)
    _check(root)
    _reset(root)
    copies = [i + 1 for i, e in enumerate(events) if e == "copy"]
    assert len(copies) == N_ROWS
    rng = random.Random(SEED)
    tail = list(range(copies[-1] + 1, len(events) + 1))  # staging rename, manifest fsync + replace, archive move
    assert {events[k - 1] for k in tail} >= {"rename", "replace", "fsync", "move"}
    points = sorted(rng.sample(copies, COPY_POINTS)) + tail
    assert len(points) >= 20
    kinds = {}
    for k in points:
        status = _fork_ingest(root, plan, k, tmp_path / f"events-{k}.json")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill point {k} not reached"
        _, manifest, _ = _paths(root)
        if manifest.exists():  # killed before the manifest's rename: no row; after it: every row
            assert len(manifest.read_bytes().splitlines()) in (0, N_ROWS)
        out = _run_inbox(root, plan)  # the kernel released the killed holder's lock: this takes it at once
        # the drop counts as ingested exactly once: by the killed run (then archived now) or by this one
        assert len(out) <= 1 and all(not d["already_ingested"] for d in out)
        _check(root)
        kinds[events[k - 1]] = kinds.get(events[k - 1], 0) + 1
        _reset(root)
    assert set(kinds) == {"copy", "rename", "replace", "fsync", "move"}, kinds

