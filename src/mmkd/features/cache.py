"""Owns filling the feature store: plan work units of missing (sample, teacher) pairs, run them, commit shards.

A unit is a run of `unit_records` consecutive curated records (manifest order) restricted to those some teacher
lacks; its plan file lists the records, so a unit runs anywhere (a thread, a Dask worker on another node)
with nothing but the curated store and the teachers. Each image is decoded once, in decoding threads that work
one batch ahead, and prepared at every needed teacher's own preprocessing; the teachers' forward passes run
in the calling thread. Units are deterministic (same records, same batches), so a resumed run writes the
same features an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from mmkd import atomic
from mmkd.config import FeaturesCfg
from mmkd.features.store import FeatureError, FeatureStore, ShardWriter
from mmkd.models.encoder import Encoder
from mmkd.models.preprocess import ImageSpec, prepare

RECORD_FIELDS = ("id", "key", "caption", "modality", "split", "shard", "row", "offset", "size", "ext")


@dataclass(frozen=True)
class TeacherEntry:
    """What planning needs to know of a teacher: its store identity and which samples it should cover."""

    name: str
    version: str
    dim: int
    modalities: tuple[str, ...]

    def covers(self, record: dict, coverage: str) -> bool:
        # coverage "domain": a teacher caches train samples of its own modalities only (the reference gives each
        # sample a subset of its teachers); held-out splits are always covered, teachers are evaluated on all
        return coverage == "all" or record["split"] != "train" or record["modality"] in self.modalities


def iter_manifest(curated_dir: Path) -> Iterator[dict]:
    """The curated manifest, streamed (planning never holds the corpus in memory)."""
    with open(Path(curated_dir) / "manifest.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                yield {k: rec.get(k) for k in RECORD_FIELDS}


def _chunks(it: Iterator[dict], n: int) -> Iterator[tuple[int, list[dict]]]:
    chunk, start = [], 0
    for i, rec in enumerate(it):
        chunk.append(rec)
        if len(chunk) == n:
            yield start, chunk
            chunk, start = [], i + 1
    if chunk:
        yield start, chunk


def plan_units(curated_dir: Path, store: FeatureStore, teachers: list[TeacherEntry], unit_records: int,
               coverage: str) -> list[Path]:
    """Write one plan file per unit that has work; returns their paths (old plans are replaced)."""
    plans = store.root / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(plans)  # a plan a killed run was writing
    for old in plans.glob("*.json"):
        old.unlink()
    out = []
    for start, chunk in _chunks(iter_manifest(curated_dir), unit_records):
        need: dict[str, list[str]] = {}
        for t in teachers:
            wanted = [r["key"] for r in chunk if t.covers(r, coverage)]
            have = store.present(t.name, t.version, wanted)
            missing = [k for k in wanted if k not in have]
            if missing:
                need[t.name] = missing
        if not need:
            continue
        keys = set().union(*need.values())
        records = [r for r in chunk if r["key"] in keys]
        digest = hashlib.sha256(json.dumps([sorted((t.name, t.version) for t in teachers), need],
                                           sort_keys=True).encode()).hexdigest()[:10]
        unit = f"u{start:09d}-{digest}"
        path = plans / f"{unit}.json"
        # whole or absent (a unit may run in another process); not fsynced: a lost plan is re-planned
        atomic.write_json(path, {"unit": unit, "records": records, "need": need,
                                 "versions": {t.name: t.version for t in teachers}}, durable=False, indent=None)
        out.append(path)
    return out


def _decode(curated_dir: Path, record: dict) -> Image.Image:
    with open(Path(curated_dir) / "shards" / f"{record['shard']}.tar", "rb") as fh:
        fh.seek(record["offset"])
        data = fh.read(record["size"])
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class Views:
    """Curation's decoded square views (memory-mapped), used for a teacher whose preprocessing is exactly the
    views' (resize the short side + centre crop, bicubic) at a size curation wrote: no decoding at all."""

    def __init__(self, curated_dir: Path, specs):
        summary = json.loads((Path(curated_dir) / "summary.json").read_text())
        sizes = set(summary.get("decoded_sizes") or [])
        self.dir = Path(curated_dir)
        self.served = {s for s in specs if s.size in sizes and s == ImageSpec(s.size, s.mean, s.std)}
        self._open: dict[tuple[int, str], np.ndarray] = {}

    def get(self, spec: ImageSpec, record: dict) -> np.ndarray:
        key = (spec.size, record["shard"])
        if key not in self._open:
            self._open[key] = np.load(self.dir / "decoded" / str(spec.size) / f"{record['shard']}.npy", mmap_mode="r")
        return np.array(self._open[key][record["row"]])

    def release(self) -> None:
        """Drop the resident pages of the views read so far (they stay in the page cache): without this a unit
        of 16k records keeps ~300 MB of views in RSS."""
        for view in self._open.values():
            view._mmap.madvise(mmap.MADV_DONTNEED)


def run_unit(plan_path: Path, curated_dir: Path, store_root: Path, encoders: dict[str, Encoder], batch_size: int,
             dtype: str, decode_workers: int = 2, progress: Callable[[int], None] | None = None,
             use_views: bool = True) -> dict:
    """Compute one unit's missing features and write one shard per teacher; returns what was written."""
    plan = json.loads(Path(plan_path).read_text())
    records, unit = plan["records"], plan["unit"]
    need = {t: set(keys) for t, keys in plan["need"].items()}
    for t, version in plan["versions"].items():
        if t in need and encoders[t].version != version:
            raise FeatureError(f"teacher '{t}': planned for version {version}, loaded {encoders[t].version}; "
                               "re-run cache_features")
    specs = {t: encoders[t].spec for t in need}
    distinct = {s: None for s in specs.values()}  # teachers sharing a preprocessing share the prepared image

    views = Views(curated_dir, distinct) if use_views else None

    def prepare_batch(batch: list[dict]) -> list[dict]:
        def one(rec):
            wanted = [s for s in distinct if any(rec["key"] in need[t] and specs[t] == s for t in need)]
            out = {s: views.get(s, rec) for s in wanted if views and s in views.served}
            if len(out) < len(wanted):
                pil = _decode(curated_dir, rec)  # decoded once, for every teacher that needs it
                out.update({s: prepare(pil, s) for s in wanted if s not in out})
            return out
        prepared = list(pool.map(one, batch))
        if views:
            views.release()
        return prepared

    # one streaming writer per teacher: memory stays one batch, however many rows a shard holds
    writers = {t: ShardWriter(store_root, t, encoders[t].version, unit, len(keys), encoders[t].embed_dim, dtype)
               for t, keys in need.items()}
    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    try:
        with ThreadPoolExecutor(max(1, decode_workers)) as pool, ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(prepare_batch, batches[0]) if batches else None
            for b, batch in enumerate(batches):
                prepared = pending.result()
                pending = ahead.submit(prepare_batch, batches[b + 1]) if b + 1 < len(batches) else None
                for t, writer in writers.items():
                    enc = encoders[t]
                    rows = [i for i, r in enumerate(batch) if r["key"] in need[t]]
                    if rows:
                        writer.append([batch[i]["key"] for i in rows],
                                      enc.encode_images(np.stack([prepared[i][specs[t]] for i in rows]), batch_size),
                                      enc.encode_texts([batch[i]["caption"] for i in rows], batch_size),
                                      [batch[i]["id"] for i in rows])
                if progress:
                    progress(len(batch))
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    written = [{"teacher": t, "version": encoders[t].version, "unit": unit, "rows": len(need[t])} for t in writers]
    return {"unit": unit, "plan": str(plan_path), "written": written, "pid": os.getpid()}


def commit_unit(store: FeatureStore, result: dict) -> int:
    """Enter a finished unit's shards into the index and retire its plan; returns the rows added."""
    n = sum(store.commit(w["teacher"], w["version"], w["unit"]) for w in result["written"])
    Path(result["plan"]).unlink(missing_ok=True)
    return n


def forwarded(results: list[dict]) -> dict[str, int]:
    """Samples each teacher embedded in this run (the incremental-caching measure)."""
    out: dict[str, int] = {}
    for res in results:
        for w in res["written"]:
            out[w["teacher"]] = out.get(w["teacher"], 0) + w["rows"]
    return out


def cache_corpus(curated_dir: Path, store_root: Path, teachers: list[tuple[object, Encoder]], cfg: FeaturesCfg,
                 map_units: Callable[[list[str]], list[dict]] | None = None, show_progress: bool = True) -> dict:
    """Bring the store up to date with the curated corpus for these (registry spec, encoder) pairs.

    Recovers what a killed run left (adopt), plans units of missing pairs, runs them here one by one (each
    committed before the next) or through `map_units` (the Prefect flow's mapped tasks), then drops feature
    sets of teacher versions no longer in the registry (cfg.prune_stale)."""
    from mmkd.progress import progress

    store = FeatureStore(store_root, create=True)
    recovered = store.adopt()
    for spec, enc in teachers:
        store.register_set(spec.name, enc.version, enc.embed_dim, cfg.dtype,
                           {"loader": spec.loader, "source": spec.source, "model": spec.model,
                            "modalities": list(spec.modalities), "preprocess": enc.spec.as_dict()})
    entries = [TeacherEntry(spec.name, enc.version, enc.embed_dim, tuple(spec.modalities)) for spec, enc in teachers]
    plans = plan_units(curated_dir, store, entries, cfg.unit_records, cfg.coverage)
    results = []
    if map_units is not None:
        for res in map_units([str(pl) for pl in plans]):
            commit_unit(store, res)
            results.append(res)
    else:
        encoders = {spec.name: enc for spec, enc in teachers}
        todo = sum(len(json.loads(pl.read_text())["records"]) for pl in plans)
        with progress(total=todo, desc="cache_features", unit="pair", disable=not show_progress) as bar:
            for pl in plans:  # committed one by one: a kill loses at most the unit in flight
                res = run_unit(pl, curated_dir, store.root, encoders, cfg.batch_size, cfg.dtype, cfg.decode_workers,
                               bar.update)
                commit_unit(store, res)
                results.append(res)
    pruned = store.prune({(spec.name, enc.version) for spec, enc in teachers}) if cfg.prune_stale else []
    store.close()
    return {"units": len(results), "forwarded": forwarded(results), "pruned_sets": pruned,
            "worker_processes": len({r["pid"] for r in results}), **recovered}
