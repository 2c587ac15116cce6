"""Benchmark: caching after +10% new pairs vs the full run (teacher forward passes and wall time, same run).

    .venv/bin/python bench/features_incremental.py [--extra 0.1]

The default embedded corpus is curated and cached with the default registry's three teachers; then 10% new
train records arrive, curation re-runs (incremental) and caching re-runs on the same store.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import append_embedded, curate_params, default_teachers, embedded, features_params  # noqa: E402

from mmkd.data.curate import curate  # noqa: E402
from mmkd.features.cache import cache_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", type=float, default=0.1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-inc-"))
    try:
        info = embedded(work / "data")
        ccfg = curate_params(workers=2, incremental=True)
        curate(work / "data", work / "curated", ccfg)
        pairs = default_teachers(work / "teachers")
        cfg = features_params()
        t0 = time.perf_counter()
        full = cache_corpus(work / "curated", work / "store", pairs, cfg, show_progress=False)
        full_s = time.perf_counter() - t0
        added = append_embedded(work / "data", round(info["records"] * args.extra / info["modalities"]))
        curate(work / "data", work / "curated", ccfg)
        t0 = time.perf_counter()
        again = cache_corpus(work / "curated", work / "store", pairs, cfg, show_progress=False)
        again_s = time.perf_counter() - t0
        f_full, f_again = sum(full["forwarded"].values()), sum(again["forwarded"].values())
        print(json.dumps({"records": info["records"], "added": added, "added_fraction": round(added / info["records"], 3),
                          "forwarded_full": full["forwarded"], "forwarded_incremental": again["forwarded"],
                          "forward_ratio": round(f_again / f_full, 4), "seconds_full": round(full_s, 2),
                          "seconds_incremental": round(again_s, 2), "time_ratio": round(again_s / full_s, 3)}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
