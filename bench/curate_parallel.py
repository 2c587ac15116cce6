"""Benchmark: curation throughput with 2 decoding workers vs 1, same data, same run (alternating, best of 3).

    .venv/bin/python bench/curate_parallel.py [--n 800] [--side 512]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import curate_params, large_images  # noqa: E402

from mmkd.config import SourceCfg  # noqa: E402
from mmkd.data.curate import curate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-"))
    try:
        large_images(work / "data", args.n, args.side)
        best = {1: 0.0, 2: 0.0}
        for r in range(args.rounds):
            for workers in (1, 2):
                cfg = curate_params(sources=[SourceCfg(name="figs", kind="manifest", path="manifest.jsonl",
                                                       modality="pathology")], workers=workers, incremental=False)
                out = work / f"out{workers}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                summary = curate(work / "data", out, cfg)
                rate = summary["decoded"] / (time.perf_counter() - t0)
                best[workers] = max(best[workers], rate)
                print(f"round {r} workers={workers}: {rate:.1f} images/s ({summary['kept']} kept)", flush=True)
        print(f"\n{args.n} JPEG images of {args.side}x{args.side}: 1 worker {best[1]:.1f} images/s, "
              f"2 workers {best[2]:.1f} images/s, speed-up {best[2] / best[1]:.2f}x (best of {args.rounds})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
