"""One writer per workspace, with real processes: a second run is refused naming the holder, or waits then proceeds;
a SIGKILLed holder frees the workspace at once; the holder's children (fork or exec) run under its lock."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.atomic import temp_path
from mmkd.data import inbox as inbox_mod
from mmkd.data.inbox import ingest_drop, plan_drop
from mmkd.steps import Context, hold_workspace
from mmkd.workspace_lock import LOCK_ENV, WorkspaceBusy, holder_info, workspace_lock

TRY_LOCK = ("import sys; from mmkd.workspace_lock import WorkspaceBusy, workspace_lock\n"
            "try:\n    with workspace_lock(sys.argv[1], 0) as how: print(how)\n"
            "except WorkspaceBusy as exc:\n    print('busy', exc); sys.exit(3)\n")


def _drop(folder: Path, n: int, tag: str) -> None:
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save(buf, format="PNG")
        (folder / f"img/{i}.png").write_bytes(buf.getvalue() + tag.encode())  # distinct bytes per drop
        rows.append(json.dumps({"id": f"{tag}-{i}", "image": f"img/{i}.png", "caption": f"x-ray {tag} {i}"}))
    (folder / "manifest.jsonl").write_text("\n".join(rows) + "\n")


def _ingest(root: Path, name: str) -> dict:
    return ingest_drop(plan_drop(root / "inbox" / name), root / "data" / "inbox" / "manifest.jsonl",
                       root / "inbox" / "processed")


def _fork(fn, *parent_closes: int) -> int:
    """Run fn in a forked child; the parent closes `parent_closes` (the child's pipe ends), so that a read of a
    child that died returns end-of-file instead of waiting."""
    pid = os.fork()
    if pid != 0:
        for fd in parent_closes:
            os.close(fd)
    else:
        code = 1
        try:
            code = fn() or 0
        except BaseException:  # noqa: BLE001 - the exit status carries it
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


@pytest.fixture()
def ws(workspace) -> Path:
    """A workspace whose runs do not wait for the lock (a second run fails at once, naming the holder)."""
    params = workspace / "params.yaml"
    params.write_text(params.read_text().replace("lock_wait_s: 10", "lock_wait_s: 0", 1))
    assert Context.load(workspace).params.workspace.lock_wait_s == 0
    return workspace


def test_a_second_run_is_refused_naming_the_holder_then_waits_and_proceeds(ws):
    """Holder A ingests a drop and is stopped in the middle of it; `mmkd stage curate` is refused naming A and
    writes nothing; a second ingestion C that may wait proceeds once A is done; both drops are in, once each."""
    from typer.testing import CliRunner

    from mmkd.cli import app

    _drop(ws / "inbox" / "drop-a", 4, "a")
    _drop(ws / "inbox" / "drop-b", 3, "b")
    holding_r, holding_w = os.pipe()
    go_r, go_w = os.pipe()

    def holder():
        copy = inbox_mod._copy_file

        def paused_copy(data, dst):  # stop mid-ingestion, one file copied, until the test says go
            if not getattr(paused_copy, "paused", False):
                paused_copy.paused = True
                os.write(holding_w, b"1")
                os.read(go_r, 1)
            copy(data, dst)

        inbox_mod._copy_file = paused_copy
        with hold_workspace(Context.load(ws), "flow inbox (drop-a)"):
            _ingest(ws, "drop-a")

    a = _fork(holder, holding_w)
    assert os.read(holding_r, 1) == b"1"
    assert holder_info(ws)["pid"] == a
    res = CliRunner().invoke(app, ["stage", "curate", "--root", str(ws)])
    assert res.exit_code == 75, res.output
    assert f"pid {a}" in res.output and "flow inbox (drop-a)" in res.output and "lock_wait_s" in res.output
    assert not (ws / "artifacts" / "curated").exists()  # refused before doing anything
    # every command that writes the workspace (or may migrate a store's index) says so too, without a traceback
    for args in (["verify"], ["evaluate"], ["data", "synth"]):
        res = CliRunner().invoke(app, [*args, "--root", str(ws)])
        assert res.exit_code == 75 and f"pid {a}" in res.output and "Traceback" not in res.output, (args, res.output)

    def waiter():  # a run allowed to wait: it proceeds when A releases the workspace
        with workspace_lock(ws, wait_s=120, command="inbox (drop-b)") as how:
            assert how == "acquired"
            _ingest(ws, "drop-b")

    c = _fork(waiter)
    os.write(go_w, b"1")
    assert _exit_code(a) == 0 and _exit_code(c) == 0
    rows = [json.loads(x) for x in (ws / "data" / "inbox" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a-0", "a-1", "a-2", "a-3", "b-0", "b-1", "b-2"]
    assert all((ws / "data" / "inbox" / r["image"]).is_file() for r in rows)


def test_a_sigkilled_holder_frees_the_workspace_and_its_temp_files_are_removed(ws):
    ready_r, ready_w = os.pipe()
    never_r, never_w = os.pipe()
    stale = ws / "artifacts" / "curated" / "shard-000000.tar"
    keep = ws / "artifacts" / "curated" / "manifest.jsonl"

    def holder():
        with hold_workspace(Context.load(ws), "mmkd stage curate"):
            stale.parent.mkdir(parents=True)
            keep.write_text("{}\n")
            with open(temp_path(stale), "wb") as fh:  # a writer half way through an atomic write
                fh.write(b"half a shard")
                fh.flush()
                os.write(ready_w, b"1")
                os.read(never_r, 1)  # never answered: killed here

    a = _fork(holder, ready_w)
    assert os.read(ready_r, 1) == b"1"
    with pytest.raises(WorkspaceBusy, match=f"pid {a} .*mmkd stage curate"):
        with workspace_lock(ws, wait_s=0):
            pass
    os.kill(a, signal.SIGKILL)
    assert _exit_code(a) == -signal.SIGKILL
    assert [p.name for p in stale.parent.iterdir() if p.name.endswith(".tmp")]  # left by the killed writer
    with hold_workspace(Context.load(ws), "the next run") as how:  # no wait: the kernel released the lock
        assert how == "acquired"
        assert not [p.name for p in stale.parent.iterdir() if p.name.endswith(".tmp")]
        assert keep.read_text() == "{}\n"
    assert holder_info(ws)["command"] == "the next run"


def test_the_holders_threads_and_children_run_under_its_lock_and_no_one_else(ws):
    """A flow's steps run in its threads (re-entrant), its `dvc`/torchrun children exec'd (inherited through
    MMKD_WORKSPACE_LOCK), forked children share it; a non-descendant with the same variable is refused."""
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()

    def holder():
        with workspace_lock(ws, wait_s=0, command="flow retrain") as how:
            assert how == "acquired"
            seen = []
            t = threading.Thread(target=lambda: seen.append(_enter(ws)))
            t.start()
            t.join()
            assert seen == ["reentrant"]
            child = subprocess.run([sys.executable, "-c", TRY_LOCK, str(ws)], capture_output=True, text=True)
            assert child.stdout.strip() == "inherited", child.stdout + child.stderr
            g = _fork(lambda: 0 if _enter(ws) == "inherited" else 1)
            assert _exit_code(g) == 0
            os.write(report_w, os.environ[LOCK_ENV].encode())
            os.read(done_r, 1)
            assert os.environ[LOCK_ENV]
        assert LOCK_ENV not in os.environ  # released: children started later hold nothing of it

    a = _fork(holder, report_w)
    env_value = os.read(report_r, 200).decode()
    assert env_value.endswith(f":{a}")
    # the forked grandchild exited: the lock is still A's; a process outside A's tree is refused despite the variable
    forged = subprocess.run([sys.executable, "-c", TRY_LOCK, str(ws)], capture_output=True, text=True,
                            env={**os.environ, LOCK_ENV: env_value})
    assert forged.returncode == 3 and f"pid {a}" in forged.stdout, forged.stdout + forged.stderr
    os.write(done_w, b"1")
    assert _exit_code(a) == 0
    with workspace_lock(ws, wait_s=0) as how:
        assert how == "acquired"


def _enter(root: Path) -> str:
    with workspace_lock(root, wait_s=0) as how:
        return how


def test_the_inbox_flow_waits_its_turn_behind_a_running_retrain(ws, prefect_harness):
    """The inbox watcher fires while another process (a retrain) holds the workspace: with no drop it returns
    without the lock; with a drop it is refused naming the holder, and the drop waits in the inbox untouched."""
    from flows.inbox import inbox

    holding_r, holding_w = os.pipe()
    go_r, go_w = os.pipe()

    def retrain_running():
        with workspace_lock(ws, wait_s=0, command="flow retrain (trigger schedule)"):
            os.write(holding_w, b"1")
            os.read(go_r, 1)

    a = _fork(retrain_running, holding_w)
    assert os.read(holding_r, 1) == b"1"
    try:
        assert inbox(root=str(ws), retrain_after=False) == {"drops": [], "refused": {}, "retrained": False}
        _drop(ws / "inbox" / "drop-1", 2, "one")
        with pytest.raises(WorkspaceBusy, match=rf"pid {a} .*flow retrain \(trigger schedule\)"):
            inbox(root=str(ws), retrain_after=False)
        assert sorted(p.name for p in (ws / "inbox" / "drop-1").rglob("*")) == ["0.png", "1.png", "img",
                                                                              "manifest.jsonl"]
        assert not (ws / "data").exists()
    finally:
        os.write(go_w, b"1")
        assert _exit_code(a) == 0
    out = inbox(root=str(ws), retrain_after=False)  # its turn: ingested
    assert [d["rows"] for d in out["drops"]] == [2] and not out["retrained"]
