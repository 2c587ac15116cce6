"""Benchmark: curation throughput, local decoding pool (curate.workers: 2) vs a local Dask cluster of 2 worker
processes (curate.executor: dask), same corpus, same run, alternating, best of N; checks that both stores are
byte-identical.

    .venv/bin/python bench/curate_dask.py [--scale 1.0] [--rounds 3] [--partition 256]

The cluster is started once, before the rounds (its start-up is printed, not counted: a pipeline on a cluster
keeps it); records/s counts every input record (kept or quarantined) over the whole curate() call.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import curate_params, embedded  # noqa: E402

from mmkd.config import DaskCfg  # noqa: E402
from mmkd.data.curate import curate  # noqa: E402
from mmkd.data.curate_dask import dask_client, decoder  # noqa: E402


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="embedded corpus size, x the default profile's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partition", type=int, default=256, help="curate.partition_records")
    ap.add_argument("--workers", type=int, default=2, help="local pool processes = Dask worker processes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-dask-"))
    try:
        embedded(work / "data", args.scale)
        cfg = curate_params(workers=args.workers, incremental=False)
        t0 = time.perf_counter()
        with dask_client(DaskCfg(n_workers=args.workers, threads_per_worker=1)) as client:
            print(f"local Dask cluster of {args.workers} processes started in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            best = {"local": 0.0, "dask": 0.0}
            for r in range(args.rounds):
                for how in ("local", "dask"):
                    out = work / how
                    shutil.rmtree(out, ignore_errors=True)
                    run_cfg = cfg.model_copy(update={"executor": how, "partition_records": args.partition})
                    decode = decoder(client, args.partition, args.workers) if how == "dask" else None
                    t0 = time.perf_counter()
                    summary = curate(work / "data", out, run_cfg, decode=decode)
                    rate = summary["input_records"] / (time.perf_counter() - t0)
                    best[how] = max(best[how], rate)
                    print(f"round {r} {how}: {rate:.1f} records/s ({summary['input_records']} records, "
                          f"{summary['kept']} kept)", flush=True)
                same = tree(work / "local") == tree(work / "dask")
                print(f"round {r}: stores byte-identical: {same}", flush=True)
                if not same:
                    raise SystemExit("the Dask store differs from the local store")
        print(f"\n{summary['input_records']} records (embedded corpus x{args.scale}): local pool of {args.workers} "
              f"{best['local']:.1f} records/s, Dask {args.workers} workers {best['dask']:.1f} records/s, "
              f"ratio dask/local {best['dask'] / best['local']:.2f} (best of {args.rounds}, partitions of "
              f"{args.partition})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
