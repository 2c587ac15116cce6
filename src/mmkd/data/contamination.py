"""Owns the contamination check: every evaluation image's pixel hash and pHash looked up in the curated store.

An evaluation image is contaminated when the curated store holds the same decoded pixels (`exact`: its content
hash is a manifest `key`) or a near duplicate under curation's own rule (`near`: pHash within
curate.near_dup_bits differing bits, found through the same pigeonhole bands as mmkd.data.index, then confirmed
by a 32x32 thumbnail mean absolute difference <= curate.near_dup_max_diff). Matches are reported per curated
split: overlaps with `train` are contamination; with `probe`/`test` they are reported apart.
Evaluation images are hashed as curation would decode them (mmkd.data.sources.files.decode_bytes), and the
hashes are cached by file (path, size, mtime) in <root>/.mmkd/, so a second check only stats the files.
The curate step writes the full report into the store (REPORT); the evaluate step calls contamination_summary,
which writes nothing there (the store is curation's output).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from mmkd import atomic
from mmkd.data import checksums
from mmkd.data.imaging import content_hash, perceptual_hash
from mmkd.data.index import THUMB, _bands, thumbnail
from mmkd.data.manifest import read_manifest
from mmkd.data.contamination_sources import EvalImage, dataset_images, present_datasets
from mmkd.data.splits import SPLITS

log = logging.getLogger("mmkd")
REPORT = "contamination.json"  # in the curated store, written by the curate step after the store is switched in
CACHE_VERSION = 1
MAX_EXAMPLES = 5


class HashCache:
    """Content hash, pHash and thumbnail per evaluation image, valid while its stamp is unchanged."""

    def __init__(self, path: Path | None):
        self.path, self.rows, self.dirty = (Path(path) if path else None), {}, False
        self.hits = self.misses = 0
        if self.path is None or not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if int(z["version"]) != CACHE_VERSION:
                    return
                for k, s, h, ph, t in zip(z["keys"], z["stamps"], z["hashes"], z["phashes"], z["thumbs"]):
                    self.rows[str(k)] = (str(s), str(h), int(ph), t)
        except (OSError, ValueError, KeyError) as exc:  # a damaged cache costs one recomputation
            log.warning("contamination: hash cache %s unreadable (%s); recomputing", self.path, exc)
            self.rows = {}

    def get(self, img: EvalImage) -> tuple[str, int, np.ndarray]:
        row = self.rows.get(img.key)
        if row is not None and row[0] == img.stamp:
            self.hits += 1
            return row[1], row[2], row[3]
        rgb = img.pixels()
        value = (content_hash(rgb), perceptual_hash(rgb), thumbnail(rgb))
        self.rows[img.key] = (img.stamp, *value)
        self.misses += 1
        self.dirty = True
        return value

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        keys = sorted(self.rows)
        buf = io.BytesIO()
        np.savez(buf, version=np.array(CACHE_VERSION), keys=np.array(keys, dtype=str),
                 stamps=np.array([self.rows[k][0] for k in keys], dtype=str),
                 hashes=np.array([self.rows[k][1] for k in keys], dtype=str),
                 phashes=np.array([self.rows[k][2] for k in keys], dtype=np.uint64),
                 thumbs=np.stack([self.rows[k][3] for k in keys]) if keys else np.zeros((0, THUMB, THUMB), np.uint8))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(self.path, buf.getvalue(), durable=False)  # a cache: losing it costs time only
        self.dirty = False


class StoreIndex:
    """The curated store's keys, pHash bands and thumbnails, in memory (a few MB per 10,000 records)."""

    def __init__(self, curated_dir: Path, near_bits: int, max_diff: float):
        d = Path(curated_dir)
        self.records = read_manifest(d / "manifest.jsonl")
        self.near_bits, self.max_diff = near_bits, max_diff
        self.by_key = {}
        for i, r in enumerate(self.records):
            self.by_key.setdefault(r["key"], i)
        self.phash = np.array([int(r["phash"], 16) for r in self.records], dtype=np.uint64)
        self.thumbs = np.zeros((len(self.records), THUMB * THUMB), np.uint8)
        rows = defaultdict(list)
        for i, r in enumerate(self.records):
            rows[r["shard"]].append((i, r["row"]))
        for shard, pairs in rows.items():
            t = np.load(d / "thumbs" / f"{shard}.npy", mmap_mode="r")
            idx = np.array(pairs)
            self.thumbs[idx[:, 0]] = np.asarray(t[idx[:, 1]]).reshape(len(idx), -1)
        self.bands: dict[tuple[int, int], list[int]] = defaultdict(list)
        if near_bits >= 0:
            for i, ph in enumerate(self.phash.tolist()):
                for b, v in enumerate(_bands(ph, near_bits)):
                    self.bands[(b, v)].append(i)

    def matches(self, digest: str, phash: int, thumb: np.ndarray) -> list[tuple[int, str, float, int]]:
        """(record index, "exact" | "near", thumbnail difference, Hamming distance) of every curated match."""
        out = []
        exact = self.by_key.get(digest)
        if exact is not None:
            out.append((exact, "exact", 0.0, 0))
        if self.near_bits < 0:
            return out
        cand = sorted({i for b, v in enumerate(_bands(phash, self.near_bits)) for i in self.bands.get((b, v), ())})
        if not cand:
            return out
        cand = np.array(cand, dtype=np.int64)
        ham = np.bitwise_count(self.phash[cand] ^ np.uint64(phash))
        cand, ham = cand[ham <= self.near_bits], ham[ham <= self.near_bits]
        if len(cand):
            diff = np.abs(self.thumbs[cand].astype(np.int16) - thumb.astype(np.int16).ravel()).mean(axis=1)
            for i, d, h in zip(cand.tolist(), diff.tolist(), ham.tolist()):
                if d <= self.max_diff and i != exact:
                    out.append((i, "near", round(float(d), 3), int(h)))
        return out


def check(curated_dir: Path, images: list[EvalImage], cfg, cache_path: Path | None = None,
          skipped: dict[str, str] | None = None) -> dict:
    """The contamination report of `images` against the curated store (cfg: CurateCfg, for the near-duplicate
    rule and decoding). Every match is listed; counts are per dataset, per match kind and per curated split."""
    store = StoreIndex(curated_dir, cfg.near_dup_bits, cfg.near_dup_max_diff)
    cache = HashCache(cache_path)
    per: dict[str, dict] = {}
    overlaps, unreadable = [], []
    for img in images:
        d = per.setdefault(img.dataset, {"images": 0, **{k: Counter() for k in ("exact", "near")}})
        d["images"] += 1
        try:
            digest, phash, thumb = cache.get(img)
        except (OSError, ValueError) as exc:  # evaluation refuses it too; listed, never silently dropped
            unreadable.append({"dataset": img.dataset, "eval_image": img.id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        hit_splits: dict[str, set] = {"exact": set(), "near": set()}
        for i, kind, diff, ham in store.matches(digest, phash, thumb):
            rec = store.records[i]
            hit_splits[kind].add(rec["split"])
            overlaps.append({"dataset": img.dataset, "eval_image": img.id, "eval_splits": list(img.splits),
                             "match": kind, "curated_id": rec["id"], "curated_key": rec["key"],
                             "curated_split": rec["split"], "curated_source": rec.get("source"),
                             "thumb_diff": diff, "hamming": ham})
        for kind, splits in hit_splits.items():
            for s in splits:
                d[kind][s] += 1  # images with at least one match in split s (an image counts once per split)
    cache.save()
    datasets = {}
    for name, d in sorted(per.items()):
        datasets[name] = {"images": d["images"],
                          **{kind: {s: d[kind][s] for s in SPLITS} for kind in ("exact", "near")},
                          "exact_train_fraction": d["exact"]["train"] / d["images"],
                          "near_train_fraction": d["near"]["train"] / d["images"]}
    files = checksums.load(curated_dir) or {}
    return {"store": {"records": len(store.records), "manifest": (files.get("manifest.jsonl") or {}).get("blake2b"),
                      "per_split": dict(Counter(r["split"] for r in store.records))},
            "rule": {"near_dup_bits": cfg.near_dup_bits, "near_dup_max_diff": cfg.near_dup_max_diff},
            "images": sum(d["images"] for d in per.values()), "datasets": datasets,
            "skipped": dict(sorted((skipped or {}).items())),
            "cache": {"hits": cache.hits, "computed": cache.misses}, "unreadable": unreadable, "overlaps": overlaps}


def summarise(report: dict, examples: int = MAX_EXAMPLES) -> dict:
    """The short form for reports and the leaderboard: totals per kind and curated split, the datasets with a
    train overlap and their fractions, and the first examples (evaluation image -> curated record)."""
    totals = {kind: {s: sum(d[kind][s] for d in report["datasets"].values()) for s in SPLITS}
              for kind in ("exact", "near")}
    worst = {name: {"exact_train_fraction": round(d["exact_train_fraction"], 6),
                    "near_train_fraction": round(d["near_train_fraction"], 6)}
             for name, d in report["datasets"].items() if d["exact"]["train"] or d["near"]["train"]}
    train = [o for o in report["overlaps"] if o["curated_split"] == "train"]
    return {"images": report["images"], "datasets": len(report["datasets"]), "totals": totals,
            "contaminated_datasets": worst, "skipped": report["skipped"], "unreadable": len(report["unreadable"]),
            "examples": [f"{o['dataset']}: {o['eval_image']} = {o['curated_id']} ({o['match']}, train)"
                         for o in train[:examples]],
            "rule": report["rule"], "store_manifest": report["store"]["manifest"]}


def workspace_report(params, ws, names: list[str] | None = None) -> dict:
    """The full report for a workspace's curated store and its evaluation data (cached hashes in .mmkd/)."""
    loaded, skipped = present_datasets(params, ws, names)
    images = []
    for name, folder, root, ds in loaded:
        try:
            images += dataset_images(name, ds, Path(folder), Path(root), params.curate)
        except (TypeError, OSError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return check(ws.curated, images, params.curate, cache_path(ws), skipped)


def cache_path(ws) -> Path:
    return ws.root / ".mmkd" / "contamination-hashes.npz"


def write_report(curated_dir: Path, report: dict) -> Path:
    return atomic.write_json(Path(curated_dir) / REPORT, report)


def contamination_summary(params, ws, names: list[str] | None = None) -> dict:
    """For the evaluate step and the leaderboard: the check of the evaluation datasets `names` (default: every
    one on disk) against the current curated store, summarised; cached, so cheap after curation ran it."""
    return summarise(workspace_report(params, ws, names))


def load_report(curated_dir: Path) -> dict | None:
    path = Path(curated_dir) / REPORT
    return json.loads(path.read_text()) if path.exists() else None
