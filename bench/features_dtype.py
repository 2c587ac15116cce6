"""Benchmark: what storing teacher features as float16 changes, against float32 (same workspace, same run).

    .venv/bin/python bench/features_dtype.py [--root .]

Takes a workspace after `make run` (float32 store), copies its curated data, teachers and stage-1 student to
a temp workspace, re-runs cache_features, align, distill and evaluate there with `features.dtype: float16`,
and compares: the raw features (max abs difference, min cosine), disk, and the evaluation means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mmkd.features.store import FeatureStore
from mmkd.steps import Context, run_step


def features(root: Path, teacher: str, version: str, dim: int, keys: np.ndarray) -> np.ndarray:
    store = FeatureStore(root)
    img, txt = store.gather(*store.locate(teacher, version, keys), dim)
    store.close()
    return np.concatenate([img, txt])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".")
    args = ap.parse_args()
    src = Path(args.root).resolve()
    ctx32 = Context.load(src)
    if ctx32.params.features.dtype != "float32":
        raise SystemExit("the source workspace must hold a float32 store")
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-fp16-"))
    try:
        for sub in ("artifacts/curated", "artifacts/teachers", "artifacts/student_stage1"):
            shutil.copytree(src / sub, work / sub)
        text = (src / "params.yaml").read_text().replace("  dtype: float32", "  dtype: float16", 1)
        assert "dtype: float16" in text
        (work / "params.yaml").write_text(text)
        ctx16 = Context.load(work)
        for step in ("cache_features", "align", "distill", "evaluate"):
            run_step(step, ctx16)
        keys = np.array([json.loads(line)["key"] for line in open(src / "artifacts/curated/manifest.jsonl")], dtype="S32")
        held32 = json.loads((ctx32.ws.teacher_features / "features.json").read_text())
        held16 = json.loads((ctx16.ws.teacher_features / "features.json").read_text())
        diffs = {}
        for t, info in held32["teachers"].items():
            a = features(ctx32.ws.teacher_features, t, info["version"], info["dim"], keys)
            b = features(ctx16.ws.teacher_features, t, held16["teachers"][t]["version"], info["dim"], keys)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            diffs[t] = {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}
        m32 = json.loads((src / "reports/metrics.json").read_text())
        m16 = json.loads((work / "reports/metrics.json").read_text())
        heads = ("zeroshot_acc1", "probe_acc1", "i2t_r1", "t2i_r1")
        means = {model: {h: [round(m32[model]["mean"][h], 4), round(m16[model]["mean"][h], 4)] for h in heads}
                 for model in m32}
        print(json.dumps({"features": diffs, "store_bytes": {"float32": held32["bytes"], "float16": held16["bytes"]},
                          "mean_metrics_float32_vs_float16": means}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
