"""Owns stage-2 multi-teacher distillation: one random eligible teacher per sample, task + FD + ICL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch

from mmkd.config import DistillCfg
from mmkd.data.store import load_curated
from mmkd.features.cache import availability, load_split, read_index
from mmkd.models.factory import image_spec, load_checkpoint, model_config, save_checkpoint
from mmkd.training.loop import MAX_LOGIT_SCALE, tokenize_all, train
from mmkd.training.losses import distillation_loss


class TeacherSampler:
    """Draws, per sample and per step, one teacher uniformly among those eligible for it."""

    def __init__(self, eligible: np.ndarray, seed: int):
        self.eligible = torch.from_numpy(eligible)
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, idx: torch.Tensor) -> torch.Tensor:
        mask = self.eligible[idx].float()
        return torch.multinomial(mask / mask.sum(1, keepdim=True), 1, generator=self.gen).squeeze(1)


def distill(stage1_dir: Path, curated_dir: Path, features_dir: Path, cfg: DistillCfg, seed: int,
            device: torch.device, out_dir: Path, log: Callable | None = None) -> dict:
    torch.manual_seed(seed)
    model, meta = load_checkpoint(stage1_dir, device)
    records, images = load_curated(curated_dir, "train", image_spec(model).size)
    ids = [r["id"] for r in records]
    feats = load_split(features_dir, "train", ids)
    index = read_index(features_dir)
    names = list(index["teachers"])
    eligible = availability(index, [r["modality"] for r in records], cfg.route_by_modality)
    orphans = ~eligible.any(1)
    eligible[orphans] = True  # a sample outside every teacher's domain may learn from any of them
    t_img = torch.stack([feats[t]["image_proj"] for t in names]).to(device)  # [T, N, d]
    t_txt = torch.stack([feats[t]["text_proj"] for t in names]).to(device)

    student_dim = model_config(meta["model"])["embed_dim"]
    if t_img.shape[-1] != student_dim:
        raise ValueError(f"projected teacher dim {t_img.shape[-1]} != student embed_dim {student_dim}; "
                         "re-run cache_features for this student")
    icl_logit = torch.nn.Parameter(torch.tensor(math.log(1.0 / cfg.icl_init_temperature), device=device),
                                   requires_grad=cfg.learn_icl_temperature)
    sampler = TeacherSampler(eligible, seed + 1)
    drawn = torch.zeros(len(names), dtype=torch.long)

    def step(m, x, tok, idx):
        choice = sampler.draw(idx)
        drawn.add_(torch.bincount(choice, minlength=len(names)))
        rows = idx.to(device)
        s_img = m.encode_image(x, normalize=True).float()
        s_txt = m.encode_text(tok, normalize=True).float()
        icl_scale = icl_logit.clamp(0, MAX_LOGIT_SCALE).exp()
        loss, parts = distillation_loss(s_img, s_txt, t_img[choice.to(device), rows], t_txt[choice.to(device), rows],
                                        m.logit_scale.exp(), icl_scale, cfg.fd_weight, cfg.icl_weight)
        return loss, {**parts, "icl_temperature": 1.0 / icl_scale.item()}

    tokens = tokenize_all(open_clip.get_tokenizer(meta["model"]), [r["caption"] for r in records])
    history = train(model, images, tokens, cfg.train, step, seed, device, "distill", log,
                    extra_params=[icl_logit] if cfg.learn_icl_temperature else None)
    share = (drawn.float() / drawn.sum().clamp(min=1)).tolist()
    history.update({f"teacher_share_{t}": s for t, s in zip(names, share)})
    history["orphan_samples"] = int(orphans.sum())
    save_checkpoint(model, out_dir, meta["model"], {"stage": 2, "teachers": names,
                                                   "icl_temperature": float(1.0 / icl_logit.exp().item())})
    return history
