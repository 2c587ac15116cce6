"""Benchmark: peak RSS of caching and of distillation on 10x the default corpus vs 1x (fresh processes).

    .venv/bin/python bench/features_memory.py [--scale 10]

For each corpus size: generate and curate the embedded corpus; cache it with the default registry's three
teachers (untrained) in a fresh process; align; distil a fresh default student for one epoch over the
aligned store in a fresh process. Each child reports its own peak RSS (getrusage).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import REPO, curate_params, default_teachers, embedded, features_params  # noqa: E402

CACHE = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(2)
from corpus import features_params
from mmkd.config import load_params
from mmkd.features.cache import cache_corpus
from mmkd.teachers.registry import load_teacher
work = Path(sys.argv[1])
specs = load_params({params!r}, "default").teachers.registry
pairs = [(s, load_teacher(s, work / "teachers", torch.device("cpu"))) for s in specs]
out = cache_corpus(work / "curated", work / "store", pairs, features_params(), show_progress=False)
print(json.dumps({{"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "forwarded": out["forwarded"]}}))
"""

DISTILL = """
import json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(2)
from mmkd.config import load_params
from mmkd.training.distill import distill
work = Path(sys.argv[1])
p = load_params({params!r}, "default")
cfg = p.distill.model_copy(update={{"train": p.distill.train.model_copy(update={{"epochs": 1}})}})
domains = {{s.name: list(s.modalities) for s in p.teachers.registry}}
hist = distill(work / "stage1", work / "curated", work / "aligned", domains, cfg, 0, torch.device("cpu"), work / "student")
print(json.dumps({{"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "steps": hist["steps"]}}))
"""


def child(code: str, work: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(work)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(work: Path, scale: float) -> int:
    import torch

    from mmkd.config import load_params
    from mmkd.data.curate import curate
    from mmkd.models.factory import create_model, save_checkpoint

    info = embedded(work / "data", scale)
    curate(work / "data", work / "curated", curate_params(workers=2))
    default_teachers(work / "teachers")
    p = load_params(REPO / "params.yaml", "default")
    torch.manual_seed(0)
    save_checkpoint(create_model(p.pretrain.model), work / "stage1", p.pretrain.model)
    return info["records"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=10)
    args = ap.parse_args()
    import numpy as np

    from mmkd.config import load_params
    from mmkd.data.store import split_records
    from mmkd.features.align import align
    from mmkd.features.store import FeatureStore
    from mmkd.models.factory import model_config

    params = str(REPO / "params.yaml")
    bench = str(Path(__file__).resolve().parent)
    rows = {}
    for scale in (1.0, args.scale):
        work = Path(tempfile.mkdtemp(prefix="mmkd-bench-mem-"))
        try:
            n = prepare(work, scale)
            cache = child(CACHE.format(bench=bench, params=params), work)
            p = load_params(params, "default")
            store = FeatureStore(work / "store")
            sets = [(s["teacher"], s["version"]) for s in store.sets()]
            store.close()
            keys = np.array([r["key"] for r in split_records(work / "curated", "train", ("key",))], dtype="S32")
            align(work / "store", sets, keys, work / "aligned", model_config(p.pretrain.model)["embed_dim"], p.align,
                  0, features_params().dtype)
            dist = child(DISTILL.format(params=params), work)
            rows[scale] = {"records": n, "cache_peak_mib": cache["peak_kib"] / 1024,
                           "distill_peak_mib": dist["peak_kib"] / 1024, "distill_steps": dist["steps"]}
            print(json.dumps({scale: rows[scale]}), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    lo, hi = rows[1.0], rows[args.scale]
    print(json.dumps({"ratio_cache": round(hi["cache_peak_mib"] / lo["cache_peak_mib"], 3),
                      "ratio_distill": round(hi["distill_peak_mib"] / lo["distill_peak_mib"], 3)}, indent=1))


if __name__ == "__main__":
    main()
