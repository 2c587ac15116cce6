"""Benchmark: caching throughput vs the teachers' bare forward passes on pre-decoded tensors (same run).

    .venv/bin/python bench/features_throughput.py [--rounds 2]

Corpus: the default embedded corpus, curated with the default settings. Teachers: the default registry's
three (ViT-S 48 px, ResNet 64 px, ViT-T 48 px), untrained. "bare" embeds every image (already decoded and
preprocessed to each teacher's input, in RAM) and every caption with each teacher; "cache" is the real step
(plan, read, decode or read curation's views, preprocess, embed, validate, write shards, index); "cache,
decoding" forces decoding every image from the tar shards (no views).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import curate_params, default_teachers, embedded, features_params  # noqa: E402

from mmkd.data.curate import curate  # noqa: E402
from mmkd.data.store import split_records  # noqa: E402
from mmkd.data.splits import SPLITS  # noqa: E402
from mmkd.features.cache import TeacherEntry, cache_corpus, commit_unit, plan_units, run_unit  # noqa: E402
from mmkd.features.store import FeatureStore  # noqa: E402
from mmkd.models.preprocess import prepare  # noqa: E402


def bare(pairs, inputs, captions, batch) -> float:
    t0 = time.perf_counter()
    for spec, enc in pairs:
        enc.encode_images(inputs[spec.name], batch)
        enc.encode_texts(captions, batch)
    return time.perf_counter() - t0


def cached(curated, root, pairs, cfg, views: bool) -> float:
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    if views:
        cache_corpus(curated, root, pairs, cfg, show_progress=False)
    else:
        store = FeatureStore(root, create=True)
        for spec, enc in pairs:
            store.register_set(spec.name, enc.version, enc.embed_dim, cfg.dtype)
        entries = [TeacherEntry(s.name, e.version, e.embed_dim, tuple(s.modalities)) for s, e in pairs]
        for pl in plan_units(curated, store, entries, cfg.unit_records, cfg.coverage):
            res = run_unit(pl, curated, root, {s.name: e for s, e in pairs}, cfg.batch_size, cfg.dtype,
                           cfg.decode_workers, use_views=False)
            commit_unit(store, res)
        store.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-tp-"))
    try:
        embedded(work / "data")
        curate(work / "data", work / "curated", curate_params(workers=2))
        pairs = default_teachers(work / "teachers")
        cfg = features_params()
        records = [r for s in SPLITS for r in split_records(work / "curated", s)]
        from mmkd.features.cache import _decode
        pil = [_decode(work / "curated", r) for r in records]
        inputs = {spec.name: np.stack([prepare(p, enc.spec) for p in pil]) for spec, enc in pairs}
        captions = [r["caption"] for r in records]
        del pil
        times = {"bare": [], "cache": [], "cache, decoding": []}
        for _ in range(args.rounds):  # interleaved, so drifts in machine load hit all three
            times["bare"].append(bare(pairs, inputs, captions, cfg.batch_size))
            times["cache"].append(cached(work / "curated", work / "store", pairs, cfg, views=True))
            times["cache, decoding"].append(cached(work / "curated", work / "store", pairs, cfg, views=False))
        best = {k: min(v) for k, v in times.items()}
        n = len(records)
        print(json.dumps({"pairs": n, "teachers": len(pairs), "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                          "pairs_per_s": {k: round(n / v, 1) for k, v in best.items()},
                          "ratio_cache_vs_bare": round(best["bare"] / best["cache"], 3),
                          "ratio_cache_decoding_vs_bare": round(best["bare"] / best["cache, decoding"], 3)}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
