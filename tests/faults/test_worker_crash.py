"""Fault tests: decoding workers that die for real (SIGSEGV, SIGKILL from inside and from outside) cost at most the
record that killed them, and a script without a `__main__` guard is refused with what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mmkd.config import CurateCfg
from mmkd.data import sources
from mmkd.data.manifest import read_manifest
from mmkd.data.workers import ordered_map
from tests.faults import crash_reader

CFG = CurateCfg(workers=2, decoded_sizes=[16], min_side=16)


@pytest.fixture(autouse=True)
def crashy_kind(monkeypatch):
    """The test reader, registered in this process only: ordered_map must hand it to its workers."""
    monkeypatch.setitem(sources.READERS, crash_reader.KIND, crash_reader.MODULE)


def _baseline(n: int, tmp: Path, skip=()) -> dict[str, dict]:
    """The same records decoded in this process, none of them crashing."""
    recs = [crash_reader.record(i, None, tmp) for i in range(n) if i not in skip]
    return {rec.key: res for rec, res in ordered_map(recs, CFG, frozenset(), workers=0)}


def test_a_record_that_kills_its_worker_is_quarantined_naming_the_signal_and_the_rest_is_kept_in_order(tmp_path):
    actions = {5: "segv", 17: "kill", 23: "once"}  # 23: killed the first time only (e.g. the OOM killer), then fine
    recs = [crash_reader.record(i, actions.get(i), tmp_path) for i in range(40)]
    out = list(ordered_map(recs, CFG, frozenset(), workers=2, chunk=4))
    assert [rec.key for rec, _ in out] == [rec.key for rec in recs]  # input order, every record answered
    res = {rec.key: r for rec, r in out}
    assert res["r005"]["error"].startswith("decoder crash: worker killed by signal 11 (SIGSEGV)")
    assert res["r017"]["error"].startswith("decoder crash: worker killed by signal 9 (SIGKILL)")
    assert res["r005"]["fingerprint"] and res["r017"]["fingerprint"]  # so the next run reuses the verdict
    assert (tmp_path / "r023.seen").exists() and "error" not in res["r023"]  # it did die once, and was kept
    base = _baseline(40, tmp_path, skip=(5, 17))
    kept = {k: r for k, r in res.items() if "error" not in r}
    assert set(kept) == set(base)
    for key, r in kept.items():  # the same candidates as a run in one process: deterministic
        assert (r["hash"], r["members"], r["width"]) == (base[key]["hash"], base[key]["members"], base[key]["width"])


def test_a_worker_killed_from_outside_while_it_holds_records_loses_none_of_them(tmp_path):
    recs = [crash_reader.record(i, "hold" if i == 10 else None, tmp_path) for i in range(24)]
    pid_file, killed = tmp_path / "r010.pid", []

    def killer():  # waits for the worker to be inside record r010, then kills it the way the OOM killer would
        for _ in range(600):
            if pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = list(ordered_map(recs, CFG, frozenset(), workers=2, chunk=4))
    thread.join()
    assert killed and killed[0] != os.getpid()
    assert [rec.key for rec, _ in out] == [rec.key for rec in recs]
    assert [r.get("error") for _, r in out] == [None] * 24  # the held record and its batch-mates all kept
    base = _baseline(24, tmp_path)
    assert [r["hash"] for _, r in out] == [base[rec.key]["hash"] for rec in recs]


def test_curation_with_a_crashing_record_writes_its_store_and_the_next_run_does_not_crash_again(tmp_path, monkeypatch):
    from mmkd.data import curate as curate_mod

    recs = [crash_reader.record(i, "segv" if i == 3 else None, tmp_path) for i in range(12)]
    monkeypatch.setattr(curate_mod, "all_records", lambda cfg, root: iter(recs))
    cfg = CFG.model_copy(update={"split_fractions": {"train": 1.0, "probe": 0.0, "test": 0.0}})
    first = curate_mod.curate(tmp_path, tmp_path / "curated", cfg)
    assert (first["kept"], first["quarantined"]) == (11, 1)
    [entry] = read_manifest(tmp_path / "curated" / "quarantine.jsonl")
    assert entry["key"] == "r003" and entry["category"] == "decoder crash"
    assert "signal 11 (SIGSEGV)" in entry["reason"]
    assert len(read_manifest(tmp_path / "curated" / "manifest.jsonl")) == 11
    again = curate_mod.curate(tmp_path, tmp_path / "curated", cfg)  # the crasher is not decoded (nor crashes) again
    assert (again["kept"], again["quarantined"], again["reused"], again["decoded"]) == (11, 1, 12, 0)


SCRIPT = """
from pathlib import Path
from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.curate import curate

cfg = CurateCfg(workers=1, sources=[SourceCfg(name="s", kind="manifest", path="m.jsonl")])
{call}
"""


def test_a_script_without_a_main_guard_is_refused_with_what_to_do(tmp_path):
    out = tmp_path / "curated"
    script = tmp_path / "curate_it.py"
    script.write_text(SCRIPT.format(call=f"curate(Path({str(tmp_path)!r}), Path({str(out)!r}), cfg)"))
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "caption": "a chest x-ray"}) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode != 0
    assert "MainGuardError" in proc.stderr and f"{script}:7 starts decoding workers" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr and "curate.workers: 0" in proc.stderr
    assert "BrokenProcessPool" not in proc.stderr
    assert not (out / "manifest.jsonl").exists()


def test_the_guard_check_tells_guarded_from_unguarded_top_level_code(tmp_path):
    script = tmp_path / "calls.py"
    script.write_text(textwrap.dedent("""
        from mmkd.data import guard

        def where():
            return guard.unguarded_call()

        outside = where()
        if __name__ == "__main__":
            print(repr(outside), repr(where()))
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.split() == [repr(f"{script}:7"), "None"], proc.stderr
