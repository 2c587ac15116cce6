"""Benchmark: stage-1 training throughput, mmkd's loop vs open_clip's own trainer (same run, alternating).

    .venv/bin/python bench/stage1_vs_openclip.py [--steps N] [--batch-size B] [--workspace PATH]
                                                [--rounds 3] [--workers 0,1] [--skip 3]

Both sides train the same registered config (pretrain.model, `mmkd-student-tiny` by default) from random
weights on the workspace's curated train split (artifacts/curated, from `make run`) for the same number of
steps (default: one epoch) at the same batch size, fp32, with torch.set_num_threads(2) in the training
process, AdamW with the pretrain lr / weight decay / betas / eps / warmup and cosine schedule, and
RandomResizedCrop(scale 0.9-1.0) augmentation:

- mmkd: `mmkd.training.loop.train` with ClipObjective (what `train_clip` runs). It has no data-loader
  processes by design: each batch is read from curation's decoded uint8 views (memory-mapped), cropped and
  normalised in the training process, and its captions tokenised there.
- open_clip: `open_clip_train.main` in this process (`--dataset-type webdataset` over the same curated tar
  shards: `<key>.png` + `<key>.txt`, which it decodes, crops and tokenises in its data pipeline;
  `--precision fp32 --device cpu`), once per `--workers` value: 0 puts that pipeline in the training process
  as mmkd does, 1 gives it a prefetching worker process (more CPU than mmkd uses, on the same cores).

Samples/s excludes start-up: the wall time from the end of step `--skip` to the end of the last step (mmkd:
timestamps from the loop's per-step log callback; open_clip: the per-step `Batch (t)` meter, whose value is
the whole cycle between two step ends, read from the `Train Epoch ... /s` lines of the log it writes with
`--log-every-n-steps 1`). Runs alternate (mmkd first in even rounds, last in odd ones); the ratio is the
median over rounds of mmkd / open_clip samples/s of the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip_train.main import main as open_clip_main
import open_clip_train.data as open_clip_data


def _files_without_eof_markers(src, handler=open_clip_data.log_and_continue):
    """open_clip_train 3.3's tar reader with webdataset 1.0's end-of-tar marker (an empty dict, which its
    group_by_keys_nothrow does not expect: KeyError 'fname' once an epoch reaches the end of a shard) dropped.
    The same reading and grouping code runs; only the marker is filtered out."""
    streams = open_clip_data.url_opener(src, handler=handler)
    files = (f for f in open_clip_data.tar_file_expander(streams, handler=handler) if f)
    return open_clip_data.group_by_keys_nothrow(files, handler=handler)


open_clip_data.tarfile_to_samples_nothrow = _files_without_eof_markers

from mmkd.config import Workspace, load_params
from mmkd.data.store import load_curated, shard_numbers
from mmkd.models.factory import create_model, input_size, register_configs
from mmkd.training.loop import tokenize_all, train
from mmkd.training.objective import ClipObjective

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"Train Epoch: \d+ \[\s*\d+/\d+ \(\d+%\)\] .*?Batch \(t\): [\d.]+, ([0-9.e+-]+)/s,")


def run_mmkd(model_name, images, captions, cfg, seed, skip) -> float:
    torch.manual_seed(seed)
    model = create_model(model_name)
    tokens = tokenize_all(open_clip.get_tokenizer(model_name), captions)
    ends: list[float] = []
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its progress bar
        train(model, images, tokens, cfg, ClipObjective(), seed, torch.device("cpu"), "mmkd",
              log=lambda metrics, step: ends.append(time.perf_counter()))
    if len(ends) != len(images) // cfg.batch_size:
        raise RuntimeError(f"mmkd logged {len(ends)} steps, expected {len(images) // cfg.batch_size}")
    return (len(ends) - skip) * cfg.batch_size / (ends[-1] - ends[skip - 1])


def run_open_clip(model_name, shards, n_shards, samples, cfg, workers, seed, skip, logs: Path, name: str) -> float:
    argv = ["--model", model_name, "--train-data", shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(samples), "--batch-size", str(cfg.batch_size), "--workers", str(workers),
            "--epochs", "1", "--lr", str(cfg.lr), "--wd", str(cfg.weight_decay), "--warmup", str(cfg.warmup_steps),
            "--beta1", str(cfg.betas[0]), "--beta2", str(cfg.betas[1]), "--eps", str(cfg.eps),
            "--precision", "fp32", "--device", "cpu", "--seed", str(seed), "--log-every-n-steps", "1",
            "--save-frequency", "0", "--logs", str(logs), "--name", name]
    if cfg.grad_clip_norm:
        argv += ["--grad-clip-norm", str(cfg.grad_clip_norm)]
    if workers > n_shards:  # open_clip asserts shards >= workers unless it resamples shards
        argv += ["--dataset-resampled"]
    handlers = list(logging.root.handlers)
    levels = {k: lg.level for k, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_level = logging.root.level
    try:
        with open(logs / f"{name}.console", "w") as console, contextlib.redirect_stderr(console), \
                contextlib.redirect_stdout(console):
            open_clip_main(argv)
    finally:  # open_clip adds a console and a file handler to the root logger and sets every logger to INFO
        for h in logging.root.handlers[len(handlers):]:
            h.close()
        logging.root.handlers = handlers
        logging.root.setLevel(root_level)
        for k in list(logging.root.manager.loggerDict):  # it also turned placeholders into INFO loggers
            logging.getLogger(k).setLevel(levels.get(k, logging.NOTSET))
        gc.collect()  # shuts down its data-loader workers
    per_step = [float(m.group(1)) for m in STEP_LINE.finditer((logs / name / "out.log").read_text())]
    if len(per_step) != samples // cfg.batch_size:
        raise RuntimeError(f"open_clip logged {len(per_step)} steps, expected {samples // cfg.batch_size}")
    seconds = sum(cfg.batch_size / s for s in per_step[skip:])
    return (len(per_step) - skip) * cfg.batch_size / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: one epoch)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: pretrain.train.batch_size")
    ap.add_argument("--workspace", type=Path, default=REPO, help="folder holding artifacts/curated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,1", help="open_clip data-loader workers, one run per value per round")
    ap.add_argument("--skip", type=int, default=3, help="first steps of every run excluded (start-up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.root.addHandler(logging.NullHandler())  # no implicit basicConfig console handler on logging.info()
    register_configs()  # makes mmkd-* configs resolvable by open_clip_train's --model
    params_file = args.workspace / "params.yaml"
    params = load_params(params_file if params_file.exists() else REPO / "params.yaml", "default")
    ws = Workspace(args.workspace, params)
    model_name = params.pretrain.model
    batch = args.batch_size or params.pretrain.train.batch_size
    records, images = load_curated(ws.curated, "train", input_size(model_name), ("caption",))
    per_epoch = len(records) // batch
    steps = args.steps or per_epoch
    if not 2 <= steps <= per_epoch:
        raise SystemExit(f"--steps must be in [2, {per_epoch}] (one epoch of {len(records)} pairs at batch {batch})")
    skip = max(1, min(args.skip, steps - 1))
    rows = steps * batch  # both sides see exactly `steps` full batches
    if rows < len(images):
        images = images.subset(np.arange(rows))
    captions = [r["caption"] for r in records[:rows]]
    cfg = params.pretrain.train.model_copy(update={"epochs": 1, "batch_size": batch, "precision": "fp32",
                                                   "log_every": 1, "checkpoint_every": 0, "resume": "never",
                                                   "accum_steps": 1, "grad_checkpointing": False})
    nums = shard_numbers(ws.curated, "train")
    shards = "::".join(str(ws.curated / "shards" / f"train-{i:05d}.tar") for i in nums)
    workers = [int(w) for w in args.workers.split(",")]
    runs = {"mmkd": None, **{f"open_clip w{w}": w for w in workers}}  # label -> open_clip workers
    labels = list(runs)
    sps: dict[str, list[float]] = {k: [] for k in labels}
    tmp = Path(tempfile.mkdtemp(prefix="mmkd-bench-s1-"))
    try:
        for r in range(args.rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                w = runs[label]
                if w is None:
                    v = run_mmkd(model_name, images, captions, cfg, params.seed, skip)
                else:
                    v = run_open_clip(model_name, shards, len(nums), rows, cfg, w, params.seed, skip, tmp,
                                      f"r{r}-w{w}")
                sps[label].append(v)
                print(f"round {r}: {label:14s} {v:8.1f} samples/s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {k: statistics.median(a / b for a, b in zip(sps["mmkd"], sps[k])) for k in labels[1:]}
    print(f"\n{model_name}, {len(records)} train pairs, {steps} steps x batch {batch} per run "
          f"(first {skip} excluded), fp32, {args.threads} torch threads, {args.rounds} alternating rounds\n")
    print("| trainer | data loading | samples/s per round | median |\n|---|---|---|---|")
    for k, w in runs.items():
        how = ("decoded views, in the training process" if w is None else
               f"webdataset PNG decoding, {f'{w} worker process(es)' if w else 'in the training process'}")
        print(f"| {k} | {how} | {' '.join(f'{v:.1f}' for v in sps[k])} | {statistics.median(sps[k]):.1f} |")
    for k, v in ratios.items():
        print(f"| **mmkd / {k}** | | median of per-round ratios | **{v:.3f}x** (target >= 1.0x) |")
    print(json.dumps({"model": model_name, "pairs": len(records), "steps": steps, "batch": batch, "skip": skip,
                      "threads": args.threads, "precision": "fp32",
                      "samples_per_s": {k: [round(x, 1) for x in v] for k, v in sps.items()},
                      "ratio_mmkd_vs": {k: round(v, 3) for k, v in ratios.items()}}, indent=1))


if __name__ == "__main__":
    main()
