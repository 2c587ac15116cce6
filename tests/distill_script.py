"""A tiny stage-2 run (routed, sampling_focus) used by tests/test_features_distill.py as a subprocess (torchrun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(stage1: str, curated: str, features: str, out: str) -> None:
    from mmkd.config import DistillCfg, TrainCfg
    from mmkd.training.distill import distill

    torch.set_num_threads(1)
    cfg = DistillCfg(strategy="routed", sampling_focus=4.0,
                     train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1, prefetch=0))
    domains = {"rad": ["xray", "ct", "mri", "ultrasound"], "path": ["pathology"]}
    hist = distill(Path(stage1), Path(curated), Path(features) / "aligned", domains, cfg, 0, torch.device("cpu"),
                   Path(out), teacher_dir=Path(features) / "raw")
    if hist["world_size"] == 1 or torch.distributed.get_rank() == 0:
        (Path(out) / "history.json").write_text(json.dumps(hist, default=float))


if __name__ == "__main__":
    main(*sys.argv[1:5])
