"""Benchmark: re-curation after +10% new records vs the full run (decodes and wall time, same run).

    .venv/bin/python bench/curate_incremental.py [--extra 0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import append_embedded, curate_params, embedded  # noqa: E402

from mmkd.data.curate import curate  # noqa: E402


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", type=float, default=0.1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-"))
    try:
        info = embedded(work / "data")
        cfg = curate_params(workers=2, incremental=True)
        t0 = time.perf_counter()
        full = curate(work / "data", work / "curated", cfg)
        full_s = time.perf_counter() - t0
        before = digests(work / "curated" / "shards")
        added = append_embedded(work / "data", round(info["records"] * args.extra / info["modalities"]))
        t0 = time.perf_counter()
        again = curate(work / "data", work / "curated", cfg)
        again_s = time.perf_counter() - t0
        after = digests(work / "curated" / "shards")
        unchanged = all(after.get(k) == v for k, v in before.items())
        print(f"full run: {full['decoded']} decoded in {full_s:.1f} s; +{added} records "
              f"(+{added / full['input_records']:.0%}): {again['decoded']} decoded, {again['reused']} reused, "
              f"{again_s:.1f} s")
        print(f"decode work of the re-run: {again['decoded'] / full['decoded']:.1%} of the full run's; wall time "
              f"{again_s / full_s:.1%}; existing shards unchanged: {unchanged} ({len(before)} of {len(after)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
