"""Training step time of every embedded model: open_clip's full text context with single-tensor AdamW (before issue
17) against the text tower cut at the batch's last end-of-text token with fused AdamW (now), side by side.

    python bench/train_step.py [--steps 20] [--rounds 3]

Each round times both variants on the same batches of real embedded-corpus captions (data/manifest.jsonl, written
by `mmkd data synth`), alternating, so that a busy machine slows both alike; the ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP

from mmkd.models.factory import create_model, input_size, register_configs
from mmkd.training.losses import clip_loss

REPO = Path(__file__).resolve().parents[1]
MODELS = {"mmkd-teacher-vit-s": 64, "mmkd-teacher-rn": 64, "mmkd-teacher-vit-t": 64, "mmkd-teacher-vit-b": 64,
          "mmkd-student-tiny": 128}  # model -> the default profile's batch size


def _variant(name: str, now: bool):
    torch.manual_seed(0)
    model = create_model(name)
    if not now:  # open_clip's own text tower: all context positions
        model.encode_text = types.MethodType(CLIP.encode_text, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=now)
    return model, opt


def _time(model, opt, images, tokens, steps: int) -> float:
    model.train()
    t0 = time.perf_counter()
    for k in range(steps):
        img, txt, scale = model(images[k], tokens[k])[:3]
        loss = clip_loss(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    register_configs()  # the mmkd tokenizers' context (32) comes from the configs
    captions = [json.loads(line)["caption"] for line in open(REPO / "data" / "manifest.jsonl")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, batch in MODELS.items():
        tok = open_clip.get_tokenizer(name)
        size = input_size(name)
        order = torch.randperm(len(captions), generator=g)
        tokens = [tok([captions[int(i)] for i in order[k * batch:(k + 1) * batch]]) for k in range(args.steps)]
        images = [torch.randn(batch, 3, size, size, generator=g) for _ in range(args.steps)]
        before, now = _variant(name, False), _variant(name, True)
        _time(*before, images[:2], tokens[:2], 2), _time(*now, images[:2], tokens[:2], 2)  # warm-up
        ratios, t_before, t_now = [], [], []
        for _ in range(args.rounds):
            t_before.append(_time(*before, images, tokens, args.steps))
            t_now.append(_time(*now, images, tokens, args.steps))
            ratios.append(t_now[-1] / t_before[-1])
        rows.append((name, batch, statistics.median(t_before) * 1e3, statistics.median(t_now) * 1e3,
                     statistics.median(ratios), [round(r, 3) for r in ratios]))
    print("| model | batch | before ms/step | now ms/step | now / before (median) | per round |")
    print("|---|---|---|---|---|---|")
    for name, batch, b, n, r, rs in rows:
        print(f"| {name} | {batch} | {b:.0f} | {n:.0f} | {r:.2f} | {rs} |")


if __name__ == "__main__":
    main()
