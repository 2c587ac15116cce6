"""Benchmark: batch reads in global vs shard-aware order, cold and warm; the store vs one file per sample; and the
share of a training step spent waiting for data with and without the prefetching reader (CPU).

    .venv/bin/python bench/read_order.py [--sizes 48 224] [--rows 32768] [--max-mib 1536] [--shard-rows 2048]
        [--batches 32] [--repeats 3] [--steps 16] [--stand-in-ms 150] [--out results.json]

Reads: per image side, a store of decoded views (one [n, S, S, 3] uint8 .npy per shard, read memory-mapped through
mmkd.data.store.SplitImages, as training reads them) and the same rows as one .npy per sample. Each pass reads the
first `--batches` batches of 128 rows of an epoch's order (sorted inside a batch, as the loop does): `global` is a
uniform permutation, `shards` mmkd.training.order.shard_order (window 4 shards, buffer 8192 rows). Cold: every file
of the layout read is evicted first (synced after writing, then posix_fadvise(POSIX_FADV_DONTNEED); `fincore` confirms),
so a pass reads from the disk as a corpus larger than the page cache would; warm: every file read once before.
The two sides of each ratio run alternately, `--repeats` times; a ratio is of the medians.

Step wait, CPU: mmkd-student-tiny (48 px) trained for `--steps` steps of 64 pairs on a 48-px store,
`train.prefetch` 0 vs 1 (cold and warm), data_wait_fraction as the loop logs it (time blocked on data / step time).
Step wait, accelerator stand-in: the loop's reader (mmkd.training.prefetch.BatchReader) gathering batches of 128
from a 224-px store (the pixels and ViT-B-16's tokenisation of the captions; global and shard-aware order) while a
step of `--stand-in-ms` runs with the GIL released (time.sleep: a GPU step is asynchronous to the host), depth 0
vs 1, cold and warm: the share of each step spent waiting, for a reference-size student on one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from mmkd.data.store import SplitImages
from mmkd.training.order import shard_order

BATCH, WINDOW, BUFFER, SEED = 128, 4, 8192, 0


def write_store(root: Path, rows: int, size: int, shard_rows: int) -> tuple[list[Path], list[Path]]:
    """The store (shards) and one file per sample, the same random pixels, synced so eviction can drop them."""
    rng = np.random.default_rng(size)
    (root / "shards").mkdir(parents=True)
    (root / "files").mkdir()
    shards, files = [], []
    for s, start in enumerate(range(0, rows, shard_rows)):
        block = rng.integers(0, 256, (min(shard_rows, rows - start), size, size, 3), dtype=np.uint8)
        shards.append(root / "shards" / f"train-{s:05d}.npy")
        _save(shards[-1], block)
        for i, row in enumerate(block):
            files.append(root / "files" / f"{start + i:08d}.npy")
            _save(files[-1], row)
    os.sync()  # dirty pages cannot be evicted
    return shards, files


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (util-linux fincore), None without it."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths[:64])],
                         capture_output=True, text=True).stdout.split()
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return res / max(size, 1)


def order_of(mode: str, n: int, shard_rows: int) -> np.ndarray:
    if mode == "global":
        return np.random.default_rng(SEED).permutation(n)
    return shard_order(np.arange(n) // shard_rows, SEED, 0, WINDOW, BUFFER)


def read_store(shards: list[Path], order: np.ndarray, batches: int) -> float:
    images = SplitImages([np.load(p, mmap_mode="r") for p in shards])
    t = time.perf_counter()
    total = 0
    for b in range(batches):
        total += int(images[np.sort(order[b * BATCH : (b + 1) * BATCH])][:, 0, 0, 0].sum())  # touch every row
    return batches * BATCH / (time.perf_counter() - t)


def read_files(files: list[Path], order: np.ndarray, batches: int) -> float:
    t = time.perf_counter()
    for b in range(batches):
        rows = np.sort(order[b * BATCH : (b + 1) * BATCH])
        np.stack([np.load(files[i]) for i in rows])
    return batches * BATCH / (time.perf_counter() - t)


def reads(root: Path, size: int, rows: int, shard_rows: int, batches: int, repeats: int) -> dict:
    shards, files = write_store(root, rows, size, shard_rows)
    rows = sum(np.load(p, mmap_mode="r").shape[0] for p in shards)
    batches = min(batches, rows // BATCH)
    orders = {m: order_of(m, rows, shard_rows) for m in ("global", "shards")}
    cases = {"store/global": (read_store, shards, "global"), "store/shards": (read_store, shards, "shards"),
             "files/global": (read_files, files, "global")}
    out: dict = {"size": size, "rows": rows, "shard_rows": shard_rows, "row_bytes": size * size * 3,
                 "batches": batches, "rows_per_s": {}, "resident_after_evict": None}
    for state in ("cold", "warm"):
        samples: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(repeats):
            for case, (fn, paths, mode) in cases.items():  # alternating: drift on a shared machine hits every case
                gc.collect()
                if state == "cold":
                    evict(paths)
                    out["resident_after_evict"] = max(out["resident_after_evict"] or 0.0,
                                                      resident_fraction(paths) or 0.0)
                else:
                    warm(paths)
                samples[case].append(fn(paths, orders[mode], batches))
        out["rows_per_s"][state] = {c: statistics.median(v) for c, v in samples.items()}
    shutil.rmtree(root)
    return out


def step_wait(root: Path, steps: int, repeats: int) -> dict:
    import open_clip
    import torch

    from mmkd.config import TrainCfg
    from mmkd.models.factory import create_model
    from mmkd.training.loop import tokenize_all, train
    from mmkd.training.objective import ClipObjective

    batch, size = 64, 48
    shards, _ = write_store(root, batch * steps, size, 512)
    words = ["lesion", "normal", "opacity", "stone", "cyst", "mass", "effusion", "nodule"]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, 6)) for _ in range(batch * steps)]
    out: dict = {}
    for state in ("cold", "warm"):
        runs: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
        for _ in range(repeats):
            for prefetch in (0, 1):
                gc.collect()
                evict(shards) if state == "cold" else warm(shards)
                images = SplitImages([np.load(p, mmap_mode="r") for p in shards])
                torch.manual_seed(0)
                model = create_model("mmkd-student-tiny")
                tokens = tokenize_all(open_clip.get_tokenizer("mmkd-student-tiny"), captions)
                logged = []
                cfg = TrainCfg(epochs=1, batch_size=batch, warmup_steps=1, prefetch=prefetch)
                h = train(model, images, tokens, cfg, ClipObjective(), 0, torch.device("cpu"), "bench",
                          lambda m, s: logged.append(m))
                runs[prefetch].append((h["data_wait_fraction"], h["samples_per_second"]))
                del images
        out[state] = {f"prefetch={p}": {"data_wait_fraction": statistics.median(w for w, _ in v),
                                        "samples_per_second": statistics.median(s for _, s in v)}
                      for p, v in runs.items()}
    shutil.rmtree(root)
    return out


def stand_in(root: Path, step_ms: float, steps: int, shard_rows: int, repeats: int) -> dict:
    import open_clip

    from mmkd.training.loop import tokenize_all
    from mmkd.training.prefetch import BatchReader

    rows = 4 * steps * BATCH  # the passes read a quarter of the store: the first `steps` batches of an epoch
    shards, _ = write_store(root, rows, 224, shard_rows)
    rng = np.random.default_rng(0)
    words = ["lesion", "normal", "opacity", "stone", "cyst", "mass", "effusion", "nodule", "left", "right", "lobe"]
    tokens = tokenize_all(open_clip.get_tokenizer("ViT-B-16"), [" ".join(rng.choice(words, 20)) for _ in range(rows)])
    orders = {m: order_of(m, rows, shard_rows) for m in ("global", "shards")}
    out: dict = {"step_ms": step_ms, "batch": BATCH, "rows": rows, "steps": steps, "shard_rows": shard_rows}
    for state in ("cold", "warm"):
        runs: dict[str, list[float]] = {f"{m}/prefetch={d}": [] for m in orders for d in (0, 1)}
        for _ in range(repeats):
            for case in runs:
                mode, depth = case.split("/prefetch=")
                gc.collect()
                evict(shards) if state == "cold" else warm(shards)
                views = SplitImages([np.load(p, mmap_mode="r") for p in shards])

                def gather(idx, views=views):
                    return views[idx], tokens[idx]

                order = orders[mode]
                batches = (np.sort(order[b * BATCH : (b + 1) * BATCH]) for b in range(steps))
                t = time.perf_counter()
                with BatchReader(gather, batches, int(depth)) as reader:
                    for _ in reader:
                        time.sleep(step_ms / 1000)
                runs[case].append(reader.wait_seconds / (time.perf_counter() - t))
                del views, gather
        out[state] = {case: statistics.median(v) for case, v in runs.items()}
    t = time.perf_counter()
    for b in range(steps):
        tokens[orders["shards"][b * BATCH : (b + 1) * BATCH]]
    out["tokenize_ms_per_batch"] = (time.perf_counter() - t) * 1000 / steps
    shutil.rmtree(root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 224])
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--max-mib", type=int, default=1536, help="cap each store's size (fewer rows at large sides)")
    ap.add_argument("--shard-rows", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="training steps per step-wait run (0: skip)")
    ap.add_argument("--stand-in-ms", type=float, default=150.0, help="accelerator stand-in step of 128 pairs (0: skip)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mmkd-read-order-", dir=args.dir))
    results: dict = {"reads": [], "batch": BATCH, "window": WINDOW, "buffer": BUFFER}
    try:
        for size in args.sizes:
            cap = args.max_mib * 2**20 // (size * size * 3)
            rows = max(args.shard_rows, min(args.rows, cap) // args.shard_rows * args.shard_rows)
            r = reads(scratch / f"s{size}", size, rows, args.shard_rows, args.batches, args.repeats)
            results["reads"].append(r)
            cold, hot = r["rows_per_s"]["cold"], r["rows_per_s"]["warm"]
            print(f"{size}px x {r['rows']} rows ({r['rows'] * r['row_bytes'] / 2**20:.0f} MiB), "
                  f"resident after evict {r['resident_after_evict']}")
            for state, v in (("cold", cold), ("warm", hot)):
                print(f"  {state}: " + ", ".join(f"{c} {x:.0f} rows/s" for c, x in v.items())
                      + f" | shards/global {v['store/shards'] / v['store/global']:.2f}x, "
                        f"store/files (global) {v['store/global'] / v['files/global']:.2f}x")
        if args.steps:
            results["step_wait"] = step_wait(scratch / "train", args.steps, max(1, args.repeats - 1))
            print(json.dumps(results["step_wait"], indent=1))
        if args.stand_in_ms:
            results["stand_in"] = stand_in(scratch / "stand_in", args.stand_in_ms, max(8, args.steps),
                                           min(args.shard_rows, 1024), max(1, args.repeats - 1))
            print(json.dumps(results["stand_in"], indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
