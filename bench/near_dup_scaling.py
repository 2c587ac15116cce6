"""Benchmark: near-duplicate lookups per record at growing corpus sizes, the old banded index vs the bounded one.

    .venv/bin/python bench/near_dup_scaling.py --sizes 10000 100000 [--old-max 100000] [--crowded 0.1]
    .venv/bin/python bench/near_dup_scaling.py --embedded 10    # curate the embedded corpus x10 with each index

Records are generated 32x32 grey images (pHash and thumbnail computed as curation does): distinct smooth
images, a `--crowded` share of images of one template (alike, like one synthetic modality: pHashes within a
few bits, thumbnails not within the threshold) and 1% planted near copies of earlier images. Each record is
looked up and, unless it is a near duplicate, added: curation's loop. Reports time per record (all records,
and the last 10% of them: the marginal cost at that size), bucket rows read and thumbnails compared per
lookup, planted copies found, and verdicts that differ between the two indexes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmkd.data import imaging
from mmkd.data.index import CurationIndex, _bands, _signed


class OldIndex(CurationIndex):
    """src/mmkd/data/index.py's near-duplicate part before the redesign (git show c9648c5:src/mmkd/data/index.py):
    bits + 1 exact-match bands, every candidate examined; with counters."""

    def __init__(self, near_bits: int, max_diff: float, folder: Path | None = None):
        super().__init__(-1, max_diff, folder)  # ids, content, images, groups: unchanged
        self.db.execute("CREATE TABLE old_bands (band INTEGER, value INTEGER, rid INTEGER)")
        self.db.execute("CREATE INDEX old_bands_i ON old_bands (band, value)")
        self.near_bits = near_bits

    def near_duplicate(self, phash: int, thumb: np.ndarray) -> tuple[str, float] | None:
        if self.near_bits < 0:
            return None
        self.stats["lookups"] += 1
        bands = _bands(phash, self.near_bits)
        where = " OR ".join(["(band=? AND value=?)"] * len(bands))
        rows = self.db.execute(f"SELECT DISTINCT rid FROM old_bands WHERE {where}",
                               [x for bv in enumerate(bands) for x in bv]).fetchall()
        self.stats["rows"] += len(rows)
        if not rows:
            return None
        rids = [r[0] for r in rows]
        found = self.db.execute(f"SELECT rid, phash FROM images WHERE rid IN ({','.join('?' * len(rids))})",
                                rids).fetchall()
        cand = np.array([r[0] for r in found], dtype=np.int64)
        other = np.array([r[1] for r in found], dtype=np.int64).view(np.uint64)
        close = cand[np.bitwise_count(other ^ np.uint64(phash)) <= self.near_bits]
        if not len(close):
            return None
        close = sorted(int(c) for c in close)
        self.stats["confirmed"] += len(close)
        found = self.db.execute(f"SELECT rid, id, thumb FROM images WHERE rid IN ({','.join('?' * len(close))}) "
                                "ORDER BY rid", close).fetchall()
        thumbs = np.stack([np.frombuffer(r[2], np.uint8) for r in found]).astype(np.int16)
        diff = np.abs(thumbs - thumb.astype(np.int16).ravel()).mean(axis=1)
        hit = np.flatnonzero(diff <= self.max_diff)
        return (found[hit[0]][1], float(diff[hit[0]])) if len(hit) else None

    def add(self, rid: str, at: str, digest: str, phash: int, thumb: np.ndarray, token: str, split: str) -> None:
        self.db.execute("INSERT INTO ids VALUES (?, ?)", (rid, at))
        self.db.execute("INSERT INTO content VALUES (?, ?)", (digest, rid))
        cur = self.db.execute("INSERT INTO images (id, phash, thumb) VALUES (?, ?, ?)",
                              (rid, _signed(phash), np.ascontiguousarray(thumb, np.uint8).tobytes()))
        if self.near_bits >= 0:
            self.db.executemany("INSERT INTO old_bands VALUES (?, ?, ?)",
                                [(b, v, cur.lastrowid) for b, v in enumerate(_bands(phash, self.near_bits))])
        self.db.execute("INSERT OR IGNORE INTO groups VALUES (?, ?)", (token, split))


_DCT = imaging._DCT32
_UP = np.clip(1 - np.abs(np.linspace(0, 3, 32)[:, None] - np.arange(4)[None, :]), 0, None)  # 4 -> 32 linear


def images(n: int, crowded: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey images [n,32,32] uint8, 64-bit pHashes, index of the copied image or -1) in record order; built in
    chunks so that 1 M records need 1 GiB (the uint8 images), not 8."""
    rng = np.random.default_rng(seed)
    # alike: one template whose low DCT frequencies sit far from their median, plus sensor noise (3 grey levels):
    # the same pHash, thumbnails about 3.4 apart (distinct at max_diff 2.5): one synthetic modality's images
    low = np.zeros((32, 32))
    low[:8, :8] = rng.choice([-1, 1], (8, 8)) * rng.uniform(10, 25, (8, 8))
    template = _DCT.T @ low @ _DCT + 128
    copy = np.where((rng.random(n) < 0.01) & (np.arange(n) > 0), (rng.random(n) * np.arange(n)).astype(int), -1)
    grey, hashes = np.zeros((n, 32, 32), np.uint8), np.zeros(n, np.uint64)
    for at in range(0, n, 65536):
        m = min(n, at + 65536) - at
        img = _UP @ rng.normal(0, 1, (m, 4, 4)) @ _UP.T * 40 + 128 + rng.normal(0, 8, (m, 32, 32))
        alike = rng.random(m) < crowded
        img[alike] = template + rng.normal(0, 3, (int(alike.sum()), 32, 32))
        grey[at:at + m] = np.clip(np.rint(img), 0, 255)
        for i in at + np.flatnonzero(copy[at:at + m] >= 0):  # a near copy: an earlier image re-encoded (+-1 grey)
            grey[i] = np.clip(grey[copy[i]].astype(np.int16) + rng.integers(-1, 2, (32, 32)), 0, 255)
        # imaging.perceptual_hash, batched: the 8x8 low DCT block against its median
        block = (_DCT @ grey[at:at + m].astype(np.float64) @ _DCT.T)[:, :8, :8].reshape(-1, 64)
        flags = block > np.median(block[:, 1:], axis=1, keepdims=True)
        hashes[at:at + m] = np.packbits(flags, axis=1, bitorder="little").view("<u8").ravel()
    for i in range(0, n, max(1, n // 20)):  # the batched hash is curation's
        assert int(hashes[i]) == imaging.perceptual_hash(np.repeat(grey[i][:, :, None], 3, axis=2)), i
    return grey, hashes, copy


def run(kind: type, grey, hashes, copy, bits: int, max_diff: float) -> dict:
    index = kind(bits, max_diff)
    n = len(hashes)
    verdicts, tail_from, t_tail = [], int(n * 0.9), 0.0
    t0 = time.perf_counter()
    try:
        for i in range(n):
            if i == tail_from:
                t_tail = time.perf_counter()
            h, t = int(hashes[i]), grey[i]
            got = index.near_duplicate(h, t)
            verdicts.append(None if got is None else got[0])
            if got is None:
                index.add(f"r{i}", "s:0", f"d{i}", h, t, f"g{i}", "train")
        end = time.perf_counter()
        stats = dict(index.stats)
    finally:
        index.close()
    planted = copy >= 0
    found = sum(1 for i in np.flatnonzero(planted) if verdicts[i] is not None)
    return {"per_record_us": (end - t0) / n * 1e6, "tail_us": (end - t_tail) / (n - tail_from) * 1e6,
            "rows": stats["rows"] / n, "confirmed": stats["confirmed"] / n, "cap_hits": stats["cap_hits"],
            "planted": int(planted.sum()), "found": found, "dups": sum(v is not None for v in verdicts),
            "verdicts": verdicts}


def embedded_run(scale: float) -> None:
    """Curate the default profile's embedded corpus at `scale` with each index (curation's own loop, 2 workers)."""
    import json

    import mmkd.data.curate as curate_mod

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus import curate_params, embedded

    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-nd-"))
    try:
        embedded(work / "data", scale)
        seen = {}
        for name, kind in (("old", OldIndex), ("new", CurationIndex)):
            class Counted(kind):
                def close(self) -> None:
                    seen[name] = dict(self.stats)
                    super().close()
            curate_mod.CurationIndex = Counted
            t0 = time.perf_counter()
            s = curate_mod.curate(work / "data", work / name, curate_params(workers=2, incremental=False))
            sec = time.perf_counter() - t0
            kept = sorted(json.loads(line)["id"] for line in open(work / name / "manifest.jsonl"))
            st = seen[name]
            n = s["input_records"]
            print(f"embedded x{scale:g}, {name}: {n} records in {sec:.1f} s ({sec / n * 1e3:.2f} "
                  f"ms/record); quarantined {s['quarantine_reasons']}; per lookup: {st['rows'] / st['lookups']:.1f} "
                  f"bucket rows, {st['confirmed'] / st['lookups']:.2f} thumbnails; cap hits {st['cap_hits']}")
            seen[name + "_kept"] = kept
        print("kept ids identical:", seen["old_kept"] == seen["new_kept"])
    finally:
        curate_mod.CurationIndex = CurationIndex
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--old-max", type=int, default=100_000, help="largest size the old index is run at")
    ap.add_argument("--crowded", type=float, default=0.0, help="share of images of one template")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--max-diff", type=float, default=2.5)
    ap.add_argument("--embedded", type=float, default=None, help="instead: curate the embedded corpus at this scale")
    args = ap.parse_args()
    if args.embedded is not None:
        return embedded_run(args.embedded)
    print(f"crowded share {args.crowded}, near_dup_bits {args.bits}, max_diff {args.max_diff}")
    print("| records | index | us/record (all) | us/record (last 10%) | bucket rows/lookup | thumbnails/lookup "
          "| cap hits | planted copies found | duplicates | verdicts differing |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for n in args.sizes:
        grey, hashes, copy = images(n, args.crowded, seed=n)
        res = {"new": run(CurationIndex, grey, hashes, copy, args.bits, args.max_diff)}
        if n <= args.old_max:
            res["old"] = run(OldIndex, grey, hashes, copy, args.bits, args.max_diff)
        for name in ("old", "new"):
            if name not in res:
                continue
            r = res[name]
            differ = "" if name == "old" or "old" not in res else \
                str(sum(a != b for a, b in zip(r["verdicts"], res["old"]["verdicts"])))
            print(f"| {n:,} | {name} | {r['per_record_us']:.0f} | {r['tail_us']:.0f} | {r['rows']:.1f} | "
                  f"{r['confirmed']:.2f} | {r['cap_hits']} | {r['found']}/{r['planted']} | {r['dups']} | {differ} |")
            base.setdefault(name, r)
            if r is not base[name]:
                b = base[name]
                print(f"|  | {name}: x{n / args.sizes[0]:g} records | x{r['per_record_us'] / b['per_record_us']:.2f} "
                      f"| x{r['tail_us'] / b['tail_us']:.2f} | | | | | | |")


if __name__ == "__main__":
    main()
