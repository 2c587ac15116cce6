"""Benchmark: the cost of a stage-2 (distillation) epoch vs a stage-1 (CLIP) epoch, per strategy (same run).

    .venv/bin/python bench/stage2_vs_stage1.py [--rounds 3] [--batch-size B] [--workspace PATH]
                                              [--strategies reference,mean,routed,relational] [--steps N]

Needs a workspace after `make run` (artifacts/curated, artifacts/student_stage1, artifacts/features/aligned and
artifacts/features/teachers). Both stages run their real entry points on the curated train split, one epoch
each, at the same batch size, in this process (torch.set_num_threads(2), the device `cpu`):

- stage 1: `train_clip` (ClipObjective) of the stage-1 checkpoint's model config, from random weights, with
  `pretrain.train`;
- stage 2: `distill` from the stage-1 checkpoint with `distill.train` and each strategy, reading teacher
  features from the feature stores (teachers: the registry's that the aligned store holds).

Epochs and batch size are overridden; everything else comes from params.yaml. The cost of an epoch is the
loop's `train_seconds` (every step, the first included; not the setup before the loop: loading the
checkpoint, opening the stores, routed's probe-quality table, nor saving after it; that is reported
separately as setup+save). Runs alternate (stage 1 first in even rounds, last in odd ones) after an
untimed 2-step warm-up; each ratio is the median over rounds of stage-2 / stage-1 seconds of the same round.
`--steps N` trains on the first N batches' rows only: for smoke tests, not for the claim.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from mmkd.config import Workspace, load_params
from mmkd.data.store import load_curated
from mmkd.features.store import FeatureStore
from mmkd.models.factory import input_size
from mmkd.training import clip as clip_mod
from mmkd.training import distill as distill_mod
from mmkd.training import loop
from mmkd.training.clip import train_clip
from mmkd.training.distill import distill

REPO = Path(__file__).resolve().parents[1]
COST_FIELDS = ("precision", "augment", "grad_clip_norm", "accum_steps", "grad_checkpointing")


def first_rows(rows: int | None):
    """The loop, on the first `rows` samples only (indices stay valid for the objective's per-sample tables)."""
    def limited(model, images, tokens, *args, **kwargs):
        if rows is not None and rows < len(images):
            images, tokens = images.subset(np.arange(rows)), loop.Tokens(tokens.tokenizer, tokens.texts[:rows])
        return loop.train(model, images, tokens, *args, **kwargs)
    return limited


def timed(fn, rows: int | None) -> tuple[float, float, int]:
    """(loop seconds, setup+save seconds, steps) of one stage run; its progress bar and prints are discarded."""
    t0 = time.perf_counter()
    with mock.patch.object(clip_mod, "train", first_rows(rows)), \
            mock.patch.object(distill_mod, "train", first_rows(rows)), \
            open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        hist = fn()
    wall = time.perf_counter() - t0
    return hist["train_seconds"], wall - hist["train_seconds"], hist["steps"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", type=Path, default=REPO)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="default: distill.train.batch_size")
    ap.add_argument("--strategies", default="reference,mean,routed,relational")
    ap.add_argument("--steps", type=int, default=None, help="smoke tests: train on the first N batches only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params_file = args.workspace / "params.yaml"
    p = load_params(params_file if params_file.exists() else REPO / "params.yaml", "default")
    ws = Workspace(args.workspace, p)
    device = torch.device("cpu")
    batch = args.batch_size or p.distill.train.batch_size
    model_name = json.loads((ws.stage1 / "model.json").read_text())["model"]  # the model stage 2 trains
    records, images = load_curated(ws.curated, "train", input_size(model_name), ("caption",))
    captions = [r["caption"] for r in records]
    rows = args.steps * batch if args.steps else None
    store = FeatureStore(ws.aligned_features)
    held = {s["teacher"] for s in store.sets()}
    store.close()
    domains = {t.name: list(t.modalities) for t in p.teachers.registry if t.name in held}
    skipped = [t.name for t in p.teachers.registry if t.name not in held]
    over = {"epochs": 1, "batch_size": batch, "resume": "never", "checkpoint_every": 0}
    cfg1 = p.pretrain.train.model_copy(update=over)
    cfg2 = p.distill.train.model_copy(update=over)
    differ = {k: (getattr(cfg1, k), getattr(cfg2, k)) for k in COST_FIELDS if getattr(cfg1, k) != getattr(cfg2, k)}
    strategies = args.strategies.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="mmkd-bench-s2-"))

    def stage1():
        return train_clip(model_name, images, captions, cfg1, p.seed, device, tmp / "s1", "stage1")

    def stage2(strategy):
        dcfg = p.distill.model_copy(update={"strategy": strategy, "train": cfg2})
        return lambda: distill(ws.stage1, ws.curated, ws.aligned_features, domains, dcfg, p.seed, device,
                               tmp / strategy, teacher_dir=ws.teacher_features)

    runs = {"stage 1": stage1, **{s: stage2(s) for s in strategies}}
    sec: dict[str, list[float]] = {k: [] for k in runs}
    setup: dict[str, list[float]] = {k: [] for k in runs}
    try:
        timed(stage1, 2 * batch)  # warm-up: first-call costs of the process, not of stage 1
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                s, extra, steps = timed(runs[name], rows)
                sec[name].append(s)
                setup[name].append(extra)
                print(f"round {r}: {name:10s} {s:7.2f} s loop ({steps} steps), {extra:5.2f} s setup+save",
                      file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {s: statistics.median(a / b for a, b in zip(sec[s], sec["stage 1"])) for s in strategies}
    print(f"\n{model_name}, {rows or len(records)} of {len(records)} train pairs, batch {batch}, "
          f"teachers {list(domains)}, {args.threads} torch threads, {args.rounds} alternating rounds"
          + (f"; not in the feature store, left out: {skipped}" if skipped else "") + "\n")
    print("| run | epoch seconds per round (loop) | setup+save, median | stage 2 / stage 1, median |\n|---|---|---|---|")
    for k in runs:
        ratio = "" if k == "stage 1" else f"**{ratios[k]:.3f}** (target <= 1.25)"
        print(f"| {k} | {' '.join(f'{v:.2f}' for v in sec[k])} | {statistics.median(setup[k]):.2f} | {ratio} |")
    if differ:
        print(f"\nnote: pretrain.train and distill.train differ in cost-relevant fields (stage 1, stage 2): {differ}")
    print(json.dumps({"model": model_name, "pairs": rows or len(records), "batch": batch, "teachers": list(domains),
                      "threads": args.threads, "train_seconds": {k: [round(x, 3) for x in v] for k, v in sec.items()},
                      "setup_save_seconds": {k: [round(x, 3) for x in v] for k, v in setup.items()},
                      "ratio_stage2_vs_stage1": {k: round(v, 3) for k, v in ratios.items()},
                      "cfg_differences": differ}, indent=1))


if __name__ == "__main__":
    main()
