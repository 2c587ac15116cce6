"""Benchmark: random training batches from the feature store vs the reference layout (one .pt per sample).

    .venv/bin/python bench/features_read.py [--samples 100000] [--batches 30]

Both layouts hold the same features (4 teachers, image + text, float32) on the same disk, written in this
run; batches of 256 random samples are read alternately from each. The reference layout is what the
MMKD-CLIP release extracts: one torch file per sample holding a dict of every teacher's tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmkd.config import load_params
from mmkd.features.store import FeatureStore, TeacherFeatures, write_shard

REPO = Path(__file__).resolve().parents[1]

DIMS = {"biomedclip": 512, "unimed": 512, "pmc": 768, "medclip": 512}


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(root: Path, n: int, shard_rows: int) -> np.ndarray:
    keys = np.array([hashlib.md5(str(i).encode()).hexdigest() for i in range(n)], dtype="S32")
    store = FeatureStore(root / "store", create=True)
    pt = root / "pt"
    pt.mkdir()
    rng = np.random.default_rng(0)
    for t, d in DIMS.items():
        store.register_set(t, "v1", d, "float32")
    for start in range(0, n, shard_rows):
        stop = min(n, start + shard_rows)
        feats = {t: (unit_rows(rng, stop - start, d), unit_rows(rng, stop - start, d)) for t, d in DIMS.items()}
        for t, (img, txt) in feats.items():
            write_shard(root / "store", t, "v1", f"u{start:09d}", keys[start:stop], img, txt, DIMS[t], "float32")
            store.commit(t, "v1", f"u{start:09d}")
        for i in range(stop - start):  # the reference: one file per sample, a dict of every teacher's tensors
            torch.save({f"{t}_{k}": torch.from_numpy(a[i].copy()) for t, (img, txt) in feats.items()
                        for k, a in (("image", img), ("text", txt))}, pt / f"{keys[start + i].decode()}.pt")
    store.close()
    return keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=load_params(REPO / "params.yaml", "default").features.unit_records,
                    help="rows per shard (default: features.unit_records of params.yaml)")
    ap.add_argument("--dir", default=None, help="where to write both layouts (default: a temp dir on /tmp's disk)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mmkd-bench-read-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        keys = build(root, args.samples, args.shard_rows)
        built = time.perf_counter() - t0
        du = {k: sum(f.stat().st_size for f in (root / k).rglob("*") if f.is_file()) for k in ("store", "pt")}
        store = FeatureStore(root / "store")
        t0 = time.perf_counter()
        reader = TeacherFeatures(store, [(t, "v1") for t in DIMS], keys)
        locate = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        times = {"store": [], "pt": []}
        for _ in range(args.batches):
            idx = np.sort(rng.choice(args.samples, args.batch_size, replace=False))
            t0 = time.perf_counter()
            got = reader.batch(idx)
            times["store"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            files = [torch.load(root / "pt" / f"{keys[i].decode()}.pt", weights_only=True) for i in idx]
            ref = {t: (torch.stack([f[f"{t}_image"] for f in files]), torch.stack([f[f"{t}_text"] for f in files]))
                   for t in DIMS}
            times["pt"].append(time.perf_counter() - t0)
            assert all(np.array_equal(got[t][0], ref[t][0].numpy()) for t in DIMS)  # the same features
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"samples": args.samples, "shard_rows": args.shard_rows, "teachers": len(DIMS), "batch_size": args.batch_size,
                          "batches": args.batches, "build_seconds": round(built, 1),
                          "store_locate_seconds": round(locate, 2),
                          "median_batch_ms": {k: round(v * 1000, 2) for k, v in med.items()},
                          "speedup": round(med["pt"] / med["store"], 1),
                          "disk_mib": {k: round(v / 2**20) for k, v in du.items()}}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
