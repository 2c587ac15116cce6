"""Synthetic image-caption pairs for the scale harness: N distinct small PNGs with varied captions, one manifest."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

MODALITIES = ["xray", "ct", "mri", "ultrasound", "pathology", "dermatology", "fundus", "oct", "endoscopy"]
FINDINGS = ["no acute finding", "a small nodule", "a large mass", "mild oedema", "a healed fracture", "an effusion",
            "scattered calcifications", "a cyst", "inflammatory changes", "normal anatomy", "a lesion", "atrophy"]
PLACES = ["left upper", "right lower", "central", "peripheral", "anterior", "posterior", "medial", "lateral"]
QUALIFIERS = ["subtle", "marked", "well defined", "ill defined", "stable", "new", "resolving", "incidental"]
SIDE = 64  # the largest decoded view of the default profile: nothing is downscaled twice


def pair(seed: int, i: int) -> tuple[np.ndarray, dict]:
    """Record i: a smooth random field (distinct per record: pHashes spread, thumbnails far apart) with a few
    shapes, tinted per modality; a caption drawn from templates and numbers."""
    rng = np.random.default_rng([seed, i])
    mod = MODALITIES[i % len(MODALITIES)]
    low = rng.normal(0, 1, (6, 6, 3))
    img = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 200).astype(np.uint8)).resize(
        (SIDE, SIDE), Image.BICUBIC), dtype=np.float64)
    for _ in range(int(rng.integers(1, 4))):
        y, x, r = rng.integers(8, SIDE - 8, 2).tolist() + [int(rng.integers(3, 10))]
        yy, xx = np.ogrid[:SIDE, :SIDE]
        img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] += rng.uniform(-60, 60)
    k = MODALITIES.index(mod)
    img += np.array([20 * (k % 3), 15 * (k % 4), 10]) + rng.normal(0, 6, img.shape)
    caption = (f"{mod} image {i}: {rng.choice(QUALIFIERS)} {rng.choice(FINDINGS)} in the {rng.choice(PLACES)} "
               f"region, about {rng.integers(2, 60)} mm; {rng.choice(QUALIFIERS)} {rng.choice(FINDINGS)}.")
    split = "train" if i % 10 < 8 else ("probe" if i % 10 == 8 else "test")
    return np.clip(img, 0, 255).astype(np.uint8), {"id": f"s{i:08d}", "caption": caption, "modality": mod,
                                                    "split": split, "labels": {}}


def _chunk(args) -> list[dict]:
    root, seed, lo, hi = args
    rows = []
    for i in range(lo, hi):
        img, rec = pair(seed, i)
        rel = f"images/{i // 1000:05d}/{rec['id']}.png"
        (Path(root) / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(Path(root) / rel, compress_level=1)
        rows.append({**rec, "image": rel})
    return rows


def generate(root: Path, n: int, seed: int = 0, workers: int = 2) -> int:
    """Write n pairs under root (images/ and manifest.jsonl, the `synthetic` source's layout); returns n."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, lo, min(n, lo + 2000)) for lo in range(0, n, 2000)]
    with ProcessPoolExecutor(workers) as pool, open(root / "manifest.jsonl", "w") as fh:
        for rows in pool.map(_chunk, jobs):
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    return n
