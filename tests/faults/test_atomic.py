"""Whole-file writes (mmkd.atomic) under a real SIGKILL: the target keeps its old bytes, the temp file left behind
is removed by the next holder of the workspace, and a live writer's temp file survives a lockless clean-up."""

from __future__ import annotations

import os
import signal

from mmkd import atomic


def test_a_writer_killed_mid_write_leaves_the_old_file_whole_and_its_temp_is_removed_later(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')
    wrote_r, wrote_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: half of the new bytes on disk (flushed), then it waits to be killed
        try:
            with atomic.replacing(target) as fh:
                fh.write(b'{"new": ')
                fh.flush()
                os.write(wrote_w, b"1")
                signal.pause()
                fh.write(b"true}")
        finally:
            os._exit(0)
    assert os.read(wrote_r, 1) == b"1"
    temp = tmp_path / f".metrics.json.{pid}.tmp"  # atomic.temp_path, as the writer named it
    assert temp.read_bytes() == b'{"new": '  # the half-written new version exists, under the temp name only
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert target.read_text() == '{"old": true}'  # readers still see the old version, whole
    assert temp.exists()  # what the kill left ...
    assert atomic.remove_stale_temps(tmp_path) == [temp]  # ... the next holder of the lock removes
    atomic.write_json(target, {"new": True})
    assert target.read_text() == '{\n "new": true\n}' and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_a_lockless_clean_up_keeps_the_temp_file_of_a_live_writer(tmp_path):
    live = tmp_path / f".state.pt.{os.getppid()}.tmp"  # the parent of this test process is alive
    dead = tmp_path / ".state.pt.999999999.tmp"  # no such pid
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    assert atomic.remove_stale_temps(tmp_path, name="state.pt", dead_writers_only=True) == [dead]
    assert live.exists()
