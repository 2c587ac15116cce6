"""Owns CLIP-style contrastive training of one open_clip model on curated pairs (teachers and stage 1)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import open_clip
import torch

from mmkd.config import TrainCfg
from mmkd.data.split_table import text_digest
from mmkd.models.factory import create_model, save_checkpoint
from mmkd.training import checkpoint, distributed
from mmkd.training.loop import tokenize_all, train
from mmkd.training.objective import ClipObjective


def train_clip(model_name: str, images: np.ndarray, captions: "Sequence[str]", cfg: TrainCfg, seed: int,
               device: torch.device, out_dir: Path, desc: str, log: Callable | None = None,
               extra_meta: dict | None = None, state_dir: Path | None = None,
               init: Callable[[torch.nn.Module], dict] | None = None, keys: "Iterable[str] | None" = None) -> dict:
    """Train a model from its config on (images, captions) and save it as safetensors (rank 0).

    init, when given, loads starting weights into the fresh model (e.g. a natural-image CLIP) and returns what
    it loaded, which becomes part of the run's fingerprint and metadata. keys: the pairs' content hashes (the
    curated `key`s), which the resume fingerprint includes (without them, a hash of the pixels is): other pixels
    under the same captions never resume. captions and keys may be a SplitTable's (Captions, key_strings()): read
    as they are needed, never held whole.
    """
    torch.manual_seed(seed)
    model = create_model(model_name, device=device)
    started_from = init(model) if init else {}
    tokens = tokenize_all(open_clip.get_tokenizer(model_name), captions)
    data_id = text_digest(captions)[:16]  # a SplitTable's Captions: computed while the table was read
    fingerprint = {"model": model_name, "init": started_from, "captions": data_id}
    if keys is not None:
        counted = _Counted(keys)
        fingerprint["keys"] = checkpoint.data_id(counted)
        if counted.n != len(captions):
            raise ValueError(f"{desc}: {counted.n} keys for {len(captions)} captions")
    elif state_dir is not None:  # no content keys given: hash the pixels themselves (reads every image once)
        h = hashlib.sha256()
        for i in range(0, len(images), 256):
            h.update(np.ascontiguousarray(images[i : i + 256]).tobytes())
        fingerprint["pixels"] = h.hexdigest()[:16]
    history = train(model, images, tokens, cfg, ClipObjective(), seed, device, desc, log, state_dir, fingerprint)
    if distributed.is_main():
        save_checkpoint(model, out_dir, model_name, {**(extra_meta or {}), "train_pairs": len(captions),
                                                     **({"init": started_from} if started_from else {})})
    return history


class _Counted:
    """An iterable that counts what it yields (keys may be a generator: their number is known once hashed)."""

    def __init__(self, items: Iterable):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item
