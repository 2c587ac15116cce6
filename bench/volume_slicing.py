"""Benchmark: volume source peak RSS against volume size, for MetaImage, NIfTI, NRRD and a DICOM series.

    .venv/bin/python bench/volume_slicing.py [--slices 64 160 320 600] [--side 512] [--dir /tmp]

Each volume is side x side x N int16 (random voxels, so no page is shared or compressed away), written
uncompressed by SimpleITK (the DICOM series: one file per slice, by GDCM). Each measurement runs in a fresh
process: list the source, then read the middle axial slice and the middle sagittal plane with load_pixels, as a
curation worker would. "peak" is the process's VmHWM (ru_maxrss would carry over the forking process's peak);
"after import" is VmHWM once SimpleITK, pydicom and numpy are loaded, before listing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CHILD = """
import json, sys, time
from pathlib import Path
from mmkd.config import CurateCfg, SourceCfg
from mmkd.data.sources import volume

def hwm():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024

root = Path(sys.argv[1])
cfg = CurateCfg(max_pixels=10**9, max_input_side=10**5)
base = hwm()
t0 = time.perf_counter()
recs = [r for axis in (2, 0) for r in volume.iter_records(SourceCfg(name="b", kind="volume", path=str(root), axis=axis,
                                                                    volume_max_bytes=1 << 34), root, cfg)]
assert [r.problem for r in recs] == [None, None], [r.problem for r in recs]
t1 = time.perf_counter()
for r in recs:
    volume.load_pixels(r, cfg)
t2 = time.perf_counter()
print(json.dumps({"import_mib": base, "peak_mib": hwm(), "list_s": t1 - t0, "read_s": t2 - t1}))
"""


def write(root: Path, fmt: str, vol: np.ndarray) -> None:
    root.mkdir(parents=True)
    if fmt == "dicom series":
        for k in range(vol.shape[0]):
            im = sitk.GetImageFromArray(vol[k])
            for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0008|0060", "CT"),
                               ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", f"0\\0\\{k}")):
                im.SetMetaData(tag, value)
            w = sitk.ImageFileWriter()
            w.KeepOriginalImageUIDOn()
            w.SetFileName(str(root / f"{k:04d}.dcm"))
            w.Execute(im)
        return
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(root / f"v.{fmt}"), useCompression=False)


def measure(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measuring {root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[64, 160, 320, 600])
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--formats", nargs="+", default=["mha", "nii", "nrrd", "dicom series"])
    ap.add_argument("--dir", default=None, help="scratch folder (needs ~ the largest volume per format)")
    args = ap.parse_args()
    print("| format | volume (voxels) | volume MiB | peak RSS MiB | after import MiB | peak - import MiB | list s | read s |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in args.slices:
        vol = rng.integers(-1024, 3000, (n, args.side, args.side), dtype=np.int16)
        for fmt in args.formats:
            tmp = Path(tempfile.mkdtemp(prefix="volbench-", dir=args.dir))
            try:
                write(tmp / "src", fmt, vol)
                r = measure(tmp / "src")
                print(f"| {fmt} | {args.side}x{args.side}x{n} | {vol.nbytes / 2**20:.0f} | {r['peak_mib']:.0f} | "
                      f"{r['import_mib']:.0f} | {r['peak_mib'] - r['import_mib']:.0f} | {r['list_s']:.2f} | "
                      f"{r['read_s']:.2f} |", flush=True)
            finally:
                shutil.rmtree(tmp)
        del vol


if __name__ == "__main__":
    main()
