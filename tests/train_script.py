"""A tiny stage-1 training run used by tests/test_training.py as a subprocess (torchrun, SIGKILL)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def tiny_pairs(n: int = 64, size: int = 48, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    words = ["lesion", "normal", "opacity", "stone", "cyst", "mass", "effusion", "nodule"]
    captions = [" ".join(rng.choice(words, 4)) for _ in range(n)]
    return images, captions


def main(out: str, cfg_json: str, sleep: float = 0.0) -> None:
    from mmkd.config import TrainCfg
    from mmkd.training import distributed
    from mmkd.training.clip import train_clip

    torch.set_num_threads(1)
    cfg = TrainCfg(**json.loads(cfg_json))
    images, captions = tiny_pairs()
    out_dir = Path(out)

    def log(metrics, step):  # slows the run down so a test can kill it between two checkpoints
        if sleep:
            time.sleep(sleep)

    hist = train_clip("mmkd-student-tiny", images, captions, cfg, 7, torch.device("cpu"), out_dir / "model", "tiny",
                      log, state_dir=out_dir / "state")
    if distributed.is_main():
        (out_dir / "history.json").write_text(json.dumps(hist, default=float))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
