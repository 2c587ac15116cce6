"""The scale harness: generate N pairs, run every stage in its own process, record each stage's cost per pair.

    .venv/bin/python bench/scale/run.py --sizes 10000 100000 [--teachers 2] [--layers 1] [--out results.json]

Then `bench/scale/report.py results.json` prints the table and draws the curves (bench/scale/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import generate  # noqa: E402

STAGES = ["curate", "validate", "cache_features", "stage1", "align", "stage2", "encode"]  # the pipeline's order


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "load_1min_at_start": os.getloadavg()[0],
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _save(out: Path, run: dict) -> None:
    """The results file with `run` in it: a kept corpus's later stages merge into the entry of its first ones."""
    results = json.loads(out.read_text()) if out.exists() else []
    for i, r in enumerate(results):
        if run.get("work") and r.get("work") == run["work"] and r["n"] == run["n"]:
            results[i] = {**r, **run, "stages": {**r.get("stages", {}), **run["stages"]}}
            break
    else:
        results.append(run)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--work", type=Path, default=None, help="folder for the corpora (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep each size's corpus and outputs in WORK/n<N> (needs "
                    "--work); a later run with the same --work reuses them: no generation, only the stages named")
    ap.add_argument("--drop-sources", action="store_true", help="delete the generated source images once curate "
                    "has run (only curate reads them): 9 kB per pair less disk at the peak")
    args = ap.parse_args()
    if args.keep and args.work is None:
        raise SystemExit("--keep needs --work")
    base = args.work.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="mmkd-scale-", dir=args.work))
    try:
        for n in args.sizes:
            work = base / f"n{n}"
            marker = work / "generated.json"
            if marker.exists():  # a kept corpus: its generation was recorded when it was made
                run = {**json.loads(marker.read_text()), "stages": {}}
                print(f"n={n}: reusing {work}", flush=True)
            else:
                t0 = time.perf_counter()
                generate(work / "data", n)
                run = {"n": n, "teachers": args.teachers, "layers": args.layers, "machine": machine(),
                       "generate_seconds": time.perf_counter() - t0, "source_bytes": sum(
                           f.stat().st_size for f in (work / "data").rglob("*") if f.is_file()), "stages": {}}
                if args.keep:
                    run["work"] = str(work)
                    marker.write_text(json.dumps(run))
                print(f"n={n}: generated in {run['generate_seconds']:.0f} s", flush=True)
            for stage in args.stages:
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, str(HERE / "stages.py"), stage, str(work), "--teachers",
                                      str(args.teachers), "--layers", str(args.layers)],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"stage {stage} failed at n={n}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["load_1min_at_start"] = load
                run["stages"][stage] = res
                print(f"  {stage}: {res['seconds']:.1f} s, {res['seconds'] / res['pairs'] * 1e3:.3f} ms/pair, "
                      f"peak RSS {res['hwm_kib'] / 1024:.0f} MiB", flush=True)
                if args.keep:
                    _save(args.out, run)  # a long run's finished stages are kept if a later one fails
                if stage == "curate" and args.drop_sources:
                    shutil.rmtree(work / "data", ignore_errors=True)
            _save(args.out, run)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
