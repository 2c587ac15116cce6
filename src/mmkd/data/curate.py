"""Owns the curation run: stream every source through the decoding workers, clean, split, and fill the store.

Incremental: a record whose fingerprint (fields + raw bytes) was curated before with the same store
configuration is not decoded again; its manifest line and shard are reused as they are. New records go
to new shards. A run whose sources lost records rebuilds from scratch (a kept record may depend on one
that is gone, through de-duplication).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from mmkd.config import CurateCfg
from mmkd.data.index import CurationIndex
from mmkd.data.sources import RawRecord, iter_source
from mmkd.data.splits import SPLITS, assign_split, group_token
from mmkd.data.store import CurationError, ShardWriter, remove_unlisted, shard_numbers
from mmkd.data.workers import ordered_map
from mmkd.progress import progress

log = logging.getLogger("mmkd")
STORE_KEYS = ("allowed_formats", "min_side", "max_input_side", "max_pixels", "max_side", "highbit_percentiles",
              "decoded_sizes", "shard_max_bytes", "shard_max_records", "near_dup_bits", "near_dup_max_diff",
              "split_fractions", "scrub_captions", "min_caption_chars")

__all__ = ["CurationError", "curate", "SPLITS"]


def config_fingerprint(cfg: CurateCfg) -> str:
    """What the stored bytes depend on; a change means every record must be curated again."""
    keys = {k: getattr(cfg, k) for k in STORE_KEYS}
    return hashlib.blake2b(json.dumps(keys, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def all_records(cfg: CurateCfg, data_root: Path):
    for spec in cfg.sources:
        yield from iter_source(spec, data_root)


class Previous:
    """What the last run left, by fingerprint: manifest lines and quarantine entries (on disk, in SQLite)."""

    def __init__(self, out_dir: Path, cfg: CurateCfg):
        self.dir, self.kept, self.quarantined = out_dir, 0, 0
        self.shards: set[str] = set()
        self._thumbs: dict[str, np.ndarray] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="mmkd-prev-")
        self.db = sqlite3.connect(Path(self._tmp.name) / "prev.sqlite", isolation_level=None)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                              "CREATE TABLE prev (fp TEXT PRIMARY KEY, kept INTEGER, line TEXT, used INTEGER);")
        summary = out_dir / "summary.json"
        if not (cfg.incremental and summary.exists() and (out_dir / "manifest.jsonl").exists()):
            return
        if json.loads(summary.read_text()).get("config") != config_fingerprint(cfg):
            log.info("curate: store configuration changed; curating everything again")
            return
        self.db.execute("BEGIN")
        for name, kept in (("manifest.jsonl", 1), ("quarantine.jsonl", 0)):
            with open(out_dir / name, encoding="utf-8") as fh:
                for line in fh:
                    entry = json.loads(line)
                    if entry.get("fingerprint"):
                        self.db.execute("INSERT OR REPLACE INTO prev VALUES (?, ?, ?, 0)",
                                        (entry["fingerprint"], kept, line))
                        if kept:
                            self.kept += 1
                            self.shards.add(entry["shard"])
                        else:
                            self.quarantined += 1
        self.db.execute("COMMIT")

    @property
    def empty(self) -> bool:
        return not (self.kept or self.quarantined)

    @property
    def known(self) -> frozenset[str]:
        return frozenset(fp for (fp,) in self.db.execute("SELECT fp FROM prev"))

    def take(self, fp: str) -> tuple[bool, str]:
        kept, line = self.db.execute("SELECT kept, line FROM prev WHERE fp=?", (fp,)).fetchone()
        self.db.execute("UPDATE prev SET used=1 WHERE fp=?", (fp,))
        return bool(kept), line

    def lost(self) -> int:
        """Kept records of the last run that no source yielded this time."""
        return self.db.execute("SELECT COUNT(*) FROM prev WHERE kept=1 AND used=0").fetchone()[0]

    def thumb(self, rec: dict) -> np.ndarray:
        if rec["shard"] not in self._thumbs:
            self._thumbs[rec["shard"]] = np.load(self.dir / "thumbs" / f"{rec['shard']}.npy", mmap_mode="r")
        return self._thumbs[rec["shard"]][rec["row"]]

    def close(self) -> None:
        self.db.close()
        self._tmp.cleanup()


def curate(data_root: Path, out_dir: Path, cfg: CurateCfg) -> dict:
    """Curate every source of cfg into out_dir (see mmkd.data.store for the layout); returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev = Previous(out_dir, cfg)
    try:
        summary = _run(Path(data_root), out_dir, cfg, prev)
    finally:
        prev.close()
    if summary is None:  # sources lost records since the last run
        log.info("curate: records were removed from the sources; curating everything again")
        prev = Previous(out_dir, cfg.model_copy(update={"incremental": False}))
        try:
            summary = _run(Path(data_root), out_dir, cfg, prev)
        finally:
            prev.close()
    return summary


def _run(data_root: Path, out_dir: Path, cfg: CurateCfg, prev: Previous) -> dict | None:
    if prev.empty:
        for sub in ("shards", "decoded", "thumbs"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    else:
        remove_unlisted(out_dir, prev.shards)
    index = CurationIndex(cfg.near_dup_bits, cfg.near_dup_max_diff)
    writers = {s: ShardWriter(out_dir, s, (shard_numbers(out_dir, s) or [-1])[-1] + 1, cfg.shard_max_bytes,
                              cfg.shard_max_records, cfg.decoded_sizes) for s in SPLITS}
    stats, per_shard = Counter(), Counter()
    per = {k: Counter() for k in ("split", "modality", "source", "modality_from", "split_from", "scrubbed", "reasons")}
    tmp_manifest, tmp_quarantine = out_dir / "manifest.jsonl.tmp", out_dir / "quarantine.jsonl.tmp"
    man, qua = open(tmp_manifest, "w", encoding="utf-8"), open(tmp_quarantine, "w", encoding="utf-8")

    def quarantine(rec: RawRecord, reason: str, category: str, fp: str | None) -> None:
        qua.write(json.dumps({"source": rec.source, "kind": rec.kind, "line": rec.line, "id": rec.id, "key": rec.key,
                              "origin": rec.origin, "reason": reason, "category": category, "record": rec.raw,
                              "fingerprint": fp}, sort_keys=True, default=str) + "\n")
        stats["quarantined"] += 1
        per["reasons"][category] += 1

    def count(entry: dict) -> None:
        stats["kept"] += 1
        per_shard[entry["shard"]] += 1
        for k in ("split", "modality", "source", "modality_from", "split_from"):
            per[k][entry[k]] += 1
        for k, v in entry.get("scrubbed", {}).items():
            per["scrubbed"][k] += v

    try:
        stream = ordered_map(all_records(cfg, data_root), cfg, prev.known, cfg.workers)
        for rec, res in progress(stream, desc="curate", unit="rec"):
            stats["records"] += 1
            fp = res["fingerprint"]
            if res.get("reused"):
                stats["reused"] += 1
                was_kept, line = prev.take(fp)
                if was_kept:
                    entry = json.loads(line)
                    index.add(entry["id"], f"{entry['source']}:{entry['origin']}", entry["key"],
                              int(entry["phash"], 16), prev.thumb(entry), entry["group"], entry["split"])
                    man.write(line)
                    count(entry)
                else:
                    qua.write(line)
                    stats["quarantined"] += 1
                    per["reasons"][json.loads(line)["category"]] += 1
                continue
            if "error" in res:
                reason = res["error"]
                quarantine(rec, reason, reason.split(":")[0].split(" (")[0], fp)
                continue
            stats["decoded"] += 1
            rid = rec.id or f"{rec.source}/{rec.key}"
            at = f"{rec.source}:{rec.origin}"
            first = index.id_seen(rid)
            if first is not None:
                quarantine(rec, f"duplicate id '{rid}' (first at {first})", "duplicate id", fp)
                continue
            same = index.content_seen(res["hash"])
            if same is not None:
                quarantine(rec, f"exact duplicate of '{same}' (same decoded pixels)", "exact duplicate", fp)
                continue
            near = index.near_duplicate(res["phash"], res["thumb"])
            if near is not None:
                quarantine(rec, f"near duplicate of '{near[0]}' (thumbnail difference {near[1]:.2f} <= "
                                f"{cfg.near_dup_max_diff})", "near duplicate", fp)
                continue
            token = group_token(rec.source, rec.group, rec.key)
            split, split_from = assign_split(rec.split, index.group_split(token), token, cfg.split_fractions)
            meta = {"id": rid, "caption": res["caption"], "modality": res["modality"], "split": split,
                    "labels": rec.labels, "source": rec.source, "licence": rec.licence, "origin": rec.origin}
            loc = writers[split].add(res["hash"], res["members"], res["image_at"], res["size"], res["ext"], meta,
                                     res["views"], res["thumb"])
            entry = {**meta, "key": res["hash"], "kind": rec.kind, "line": rec.line, "group": token,
                     "modality_from": res["modality_from"], "split_from": split_from, "fingerprint": fp,
                     "phash": f"{res['phash']:016x}", "width": res["width"], "height": res["height"],
                     "orig_width": res["orig_width"], "orig_height": res["orig_height"], **loc}
            if res["scrubbed"]:
                entry["scrubbed"] = res["scrubbed"]
            index.add(rid, at, res["hash"], res["phash"], res["thumb"], token, split)
            man.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            count(entry)
        for w in writers.values():
            w.close()
    finally:
        man.close()
        qua.close()
        index.close()
    if prev.lost():  # records of the last run that no source yields any more: the caller rebuilds
        tmp_manifest.unlink()
        tmp_quarantine.unlink()
        return None
    if stats["kept"] == 0:
        raise CurationError(f"no usable records in {len(cfg.sources)} source(s) ({stats['quarantined']} quarantined; "
                            f"see {tmp_quarantine})")
    os.replace(tmp_manifest, out_dir / "manifest.jsonl")
    os.replace(tmp_quarantine, out_dir / "quarantine.jsonl")
    listed = set(per_shard)
    remove_unlisted(out_dir, listed)
    # open_clip_train's convention: shard sizes beside the shards, so --train-data needs no sample count
    (out_dir / "shards" / "sizes.json").write_text(json.dumps({f"{s}.tar": n for s, n in sorted(per_shard.items())},
                                                              indent=1))
    summary = {
        "config": config_fingerprint(cfg), "decoded_sizes": cfg.decoded_sizes,
        "input_records": stats["records"], "kept": stats["kept"], "quarantined": stats["quarantined"],
        "kept_per_split": {s: per["split"][s] for s in SPLITS},
        "kept_per_modality": dict(sorted(per["modality"].items())),
        "kept_per_source": dict(sorted(per["source"].items())),
        "modality_from": dict(sorted(per["modality_from"].items())),
        "split_from": dict(sorted(per["split_from"].items())),
        "unknown_modality": per["modality"]["unknown"],
        "scrubbed_identifiers": dict(sorted(per["scrubbed"].items())),
        "quarantine_reasons": dict(sorted(per["reasons"].items())),
        "shards": len(listed),
    }
    # summary.json describes the store only, so an incremental run that reuses everything leaves the DVC output
    # (and every stage after it) unchanged; what this run decoded and reused is returned and logged instead
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return {**summary, "decoded": stats["decoded"], "reused": stats["reused"]}
