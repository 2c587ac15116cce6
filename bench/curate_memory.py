"""Benchmark: peak RSS of curating 10x the default corpus vs 1x (each in a fresh process, same run).

    .venv/bin/python bench/curate_memory.py [--scale 10]

Reports the curating process's own peak (getrusage) and the largest decoding worker's sampled peak (psutil).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import REPO, embedded  # noqa: E402

CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
import psutil
from mmkd.config import load_params
from mmkd.data.curate import curate

peak, done = {"kib": 0}, threading.Event()

def sample():  # the decoding workers are forked by a fork server, not by us: sample their RSS every 20 ms
    me = psutil.Process()
    while not done.is_set():
        for p in me.children(recursive=True):
            try:
                peak["kib"] = max(peak["kib"], p.memory_info().rss // 1024)
            except psutil.Error:
                pass
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
cfg = load_params(sys.argv[3], "default").curate.model_copy(update={"workers": 2, "incremental": False})
s = curate(Path(sys.argv[1]), Path(sys.argv[2]), cfg)
done.set()
print(json.dumps({"kept": s["kept"], "seconds": time.perf_counter() - t0,
                  "main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "worker_kib": peak["kib"]}))
"""


def measure(data: Path, out: Path) -> dict:
    code = "if __name__ == '__main__':\n" + "\n".join("    " + line for line in CHILD.strip().splitlines())
    script = out.parent / f"measure_{out.name}.py"
    script.write_text(code)  # a file, not -c: the fork server re-imports the main module
    res = subprocess.run([sys.executable, str(script), str(data), str(out), str(REPO / "params.yaml")], check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-"))
    try:
        embedded(work / "x1", 1.0)
        embedded(work / "xN", args.scale)
        one, big = measure(work / "x1", work / "c1"), measure(work / "xN", work / "cN")
        for name, r in (("1x", one), (f"{args.scale:g}x", big)):
            print(f"{name}: {r['kept']} records in {r['seconds']:.1f} s; peak RSS curating process "
                  f"{r['main_kib'] / 1024:.0f} MiB, largest worker {r['worker_kib'] / 1024:.0f} MiB")
        print(f"\npeak RSS ratio {args.scale:g}x / 1x: curating process {big['main_kib'] / one['main_kib']:.2f}, "
              f"workers {big['worker_kib'] / one['worker_kib']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
