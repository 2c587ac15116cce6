"""Owns the curation run: stream every source through the decoding workers, clean, split, and fill the store.

Incremental: a record whose fingerprint (fields + raw bytes) was curated before with the same store
configuration is not decoded again; its manifest line and shard are reused as they are. New records go
to new shards. A run whose sources lost records rebuilds from scratch (a kept record may depend on one
that is gone, through de-duplication), numbering shards from 00000 as a first run would.
Every run writes a new generation of the store beside the live one (kept shards hard-linked into it, new
shards, then the metadata, checksums.json last) and switches it in whole (mmkd.data.generation): a kill at
any point leaves the previous store readable, and the next run removes the leftovers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from mmkd.atomic import write_bytes
from mmkd.config import CurateCfg
from mmkd.data import checksums
from mmkd.data.generation import Generations, link_or_copy
from mmkd.data.index import CurationIndex
from mmkd.data.sources import RawRecord, iter_source
from mmkd.data.splits import SPLITS, assign_split, group_token
from mmkd.data.store import CurationError, ShardWriter, remove_unlisted, shard_numbers
from mmkd.data.workers import Decoder, ordered_map
from mmkd.progress import progress

log = logging.getLogger("mmkd")
STORE_KEYS = ("allowed_formats", "min_side", "max_input_side", "max_pixels", "max_side", "highbit_percentiles",
              "decoded_sizes", "shard_max_bytes", "shard_max_records", "near_dup_bits", "near_dup_max_diff",
              "split_fractions", "scrub_captions", "min_caption_chars", "max_caption_chars", "min_pixel_std",
              "max_file_bytes", "max_sidecar_bytes", "max_line_bytes", "max_inflated_bytes", "max_header_bytes")

STORE_FILES = ("summary.json", "manifest.jsonl", checksums.NAME)  # any of them: a folder curation may replace
__all__ = ["CurationError", "curate", "SPLITS"]


def config_fingerprint(cfg: CurateCfg) -> str:
    """What the stored bytes depend on; a change means every record must be curated again."""
    keys = {k: getattr(cfg, k) for k in STORE_KEYS}
    return hashlib.blake2b(json.dumps(keys, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def all_records(cfg: CurateCfg, data_root: Path):
    for spec in cfg.sources:
        yield from iter_source(spec, data_root, cfg)


class Previous:
    """What the last run left, by fingerprint: manifest lines and quarantine entries (on disk, in SQLite)."""

    def __init__(self, out_dir: Path, cfg: CurateCfg):
        self.dir, self.kept, self.quarantined = out_dir, 0, 0
        self.shards: Counter = Counter()  # shard -> manifest rows
        self.sizes = cfg.decoded_sizes
        self._thumbs: dict[str, np.ndarray] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="mmkd-prev-")
        self.db = sqlite3.connect(Path(self._tmp.name) / "prev.sqlite", isolation_level=None)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                              "CREATE TABLE prev (fp TEXT PRIMARY KEY, kept INTEGER, line TEXT, used INTEGER);")
        self.checksums: dict | None = None
        if not cfg.incremental:
            return
        try:
            self._load(out_dir, cfg)
            problems = checksums.cheap_problems(out_dir, self.shards, self.sizes, self.checksums)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:  # a store damaged outside curation (or by a version without generations): start afresh
            log.warning("curate: the previous store is damaged (%s); curating everything again",
                        "; ".join(problems[:3]))
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.execute("DELETE FROM prev")
            self.kept = self.quarantined = 0
            self.shards.clear()

    def _load(self, out_dir: Path, cfg: CurateCfg) -> None:
        summary = out_dir / "summary.json"
        if not (summary.exists() and (out_dir / "manifest.jsonl").exists()):
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
                            self.shards[entry["shard"]] += 1
                        else:
                            self.quarantined += 1
        self.db.execute("COMMIT")
        self.checksums = checksums.load(out_dir)

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

    def link_into(self, gen: Path) -> dict[str, dict]:
        """Hard-link every shard file of the last run into the new generation; returns their checksums entries."""
        entries = {}
        for shard, rows in sorted(self.shards.items()):
            for rel in checksums.shard_files(shard, self.sizes).values():
                (gen / rel).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(self.dir / rel, gen / rel)
                entries[rel] = (self.checksums or {}).get(rel) or checksums.file_entry(gen / rel, rows)
        return entries

    def thumb(self, rec: dict) -> np.ndarray:
        if rec["shard"] not in self._thumbs:
            self._thumbs[rec["shard"]] = np.load(self.dir / "thumbs" / f"{rec['shard']}.npy", mmap_mode="r")
        return self._thumbs[rec["shard"]][rec["row"]]

    def close(self) -> None:
        self.db.close()
        self._tmp.cleanup()


def curate(data_root: Path, out_dir: Path, cfg: CurateCfg, extra: dict[str, bytes] | None = None,
           decode: Decoder | None = None) -> dict:
    """Curate every source of cfg into out_dir (see mmkd.data.store for the layout); returns the summary.
    `extra`: other files of the store (name -> bytes), written into the same generation. `decode`: where records
    are decoded (default: workers.ordered_map, cfg.workers local processes; mmkd.data.curate_dask: a Dask cluster)."""
    gens = Generations(Path(out_dir), cfg.durable)
    for what in gens.recover():
        log.info("curate: after an interrupted run: %s", what)
    live = gens.live
    if live.is_dir() and any(live.iterdir()) and not any((live / n).exists() for n in STORE_FILES):
        raise CurationError(f"{live}: not a curated store (none of {', '.join(STORE_FILES)}); refusing to replace "
                            "it: curate into a new or empty folder")
    summary = None
    for incremental in ((True, False) if cfg.incremental else (False,)):
        prev = Previous(gens.live, cfg.model_copy(update={"incremental": incremental}))
        try:
            summary = _run(Path(data_root), gens.begin(), cfg, prev, extra or {}, decode or ordered_map)
        finally:
            prev.close()
        if summary is not None:
            break
        # sources lost records since the last run
        log.info("curate: records were removed from the sources; curating everything again")
    gens.commit()
    return summary


def _run(data_root: Path, out_dir: Path, cfg: CurateCfg, prev: Previous, extra: dict[str, bytes],
         decode: Decoder) -> dict | None:
    """Fill the empty generation out_dir; None when the sources lost records of prev (the caller rebuilds)."""
    files = prev.link_into(out_dir)  # checksums.json entries of the generation, filled as files are written
    index = CurationIndex(cfg.near_dup_bits, cfg.near_dup_max_diff)
    writers = {s: ShardWriter(out_dir, s, (shard_numbers(out_dir, s) or [-1])[-1] + 1, cfg.shard_max_bytes,
                              cfg.shard_max_records, cfg.decoded_sizes, cfg.durable) for s in SPLITS}
    stats, per_shard = Counter(), Counter()
    per = {k: Counter() for k in ("split", "modality", "source", "modality_from", "split_from", "scrubbed", "reasons")}
    # written in place: the generation is not visible before commit
    man, qua = (checksums.HashedText(out_dir / name, cfg.durable) for name in ("manifest.jsonl", "quarantine.jsonl"))

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
        stream = decode(all_records(cfg, data_root), cfg, prev.known, cfg.workers)
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
            token = group_token(rec.source, rec.group, rec.key, cfg.group_key)
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
            files.update(w.checksums)
    finally:
        files["manifest.jsonl"], files["quarantine.jsonl"] = man.close(), qua.close()
        index.close()
    if prev.lost():  # records of the last run that no source yields any more: the caller rebuilds
        return None
    if stats["kept"] == 0:
        raise CurationError(f"no usable records in {len(cfg.sources)} source(s) ({stats['quarantined']} quarantined; "
                            f"see {out_dir / 'quarantine.jsonl'}, removed by the next run)")
    listed = set(per_shard)
    for name in remove_unlisted(out_dir, listed):
        files.pop(name, None)
    # open_clip_train's convention: shard sizes beside the shards, so --train-data needs no sample count
    put(out_dir, "shards/sizes.json", json.dumps({f"{s}.tar": n for s, n in sorted(per_shard.items())}, indent=1),
        files, cfg.durable)
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
    put(out_dir, "summary.json", json.dumps(summary, indent=1, sort_keys=True), files, cfg.durable)
    for name, data in sorted(extra.items()):
        put(out_dir, name, data, files, cfg.durable)
    write_bytes(out_dir / checksums.NAME, checksums.dump(files), cfg.durable)  # last: a generation with it is complete
    return {**summary, "decoded": stats["decoded"], "reused": stats["reused"]}


def put(gen: Path, rel: str, data: str | bytes, files: dict[str, dict], durable: bool) -> None:
    data = data.encode() if isinstance(data, str) else data
    write_bytes(gen / rel, data, durable)
    files[rel] = checksums.entry(data)
