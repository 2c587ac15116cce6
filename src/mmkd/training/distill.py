"""Owns stage-2 multi-teacher distillation: one random eligible teacher per sample, task + FD + ICL.

Teacher targets are the aligned (projected, student-dimension) features, read from the feature store batch by
batch: no teacher runs here, and nothing corpus-sized but the per-sample shard locations is held in memory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch

from mmkd.config import DistillCfg
from mmkd.data.store import load_curated
from mmkd.features.store import FeatureError, FeatureStore, TeacherFeatures
from mmkd.models.factory import image_spec, load_checkpoint, model_config, save_checkpoint
from mmkd.training.loop import MAX_LOGIT_SCALE, tokenize_all, train
from mmkd.training.losses import distillation_loss


def routing(domains: dict[str, list[str]], modalities: list[str], route_by_modality: bool) -> np.ndarray:
    """[N, T] bool: which teachers may supervise each sample (by the teacher's declared domain, if routing)."""
    names = list(domains)
    mask = np.ones((len(modalities), len(names)), dtype=bool)
    if route_by_modality:
        for j, t in enumerate(names):
            allowed = set(domains[t])
            mask[:, j] = [m in allowed for m in modalities]
    return mask


class TeacherSampler:
    """Draws, per sample and per step, one teacher uniformly among those eligible for it."""

    def __init__(self, eligible: np.ndarray, seed: int):
        self.eligible = torch.from_numpy(eligible)
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, idx: torch.Tensor) -> torch.Tensor:
        mask = self.eligible[idx].float()
        return torch.multinomial(mask / mask.sum(1, keepdim=True), 1, generator=self.gen).squeeze(1)


def eligibility(records: list[dict], available: np.ndarray, domains: dict[str, list[str]], route: bool) -> tuple[np.ndarray, int]:
    """Routed and available teachers per sample; a sample outside every teacher's domain may learn from any
    available one. A sample with no teacher features at all is an error naming it."""
    eligible = routing(domains, [r["modality"] for r in records], route) & available
    orphans = ~eligible.any(1)
    eligible[orphans] = available[orphans]
    bare = np.flatnonzero(~eligible.any(1))
    if len(bare):
        ids = ", ".join(records[i]["id"] for i in bare[:5])
        raise FeatureError(f"{len(bare)} train samples have no teacher features (e.g. {ids}); run cache_features "
                           "and align, or widen features.coverage")
    return eligible, int(orphans.sum())


def distill(stage1_dir: Path, curated_dir: Path, aligned_dir: Path, domains: dict[str, list[str]], cfg: DistillCfg,
            seed: int, device: torch.device, out_dir: Path, log: Callable | None = None) -> dict:
    """domains: teacher -> modalities, in registry order; the aligned store holds one version per teacher."""
    torch.manual_seed(seed)
    model, meta = load_checkpoint(stage1_dir, device)
    records, images = load_curated(curated_dir, "train", image_spec(model).size, ("id", "key", "caption", "modality"))
    store = FeatureStore(aligned_dir)
    held = {s["teacher"]: s for s in store.sets()}
    names = list(domains)
    missing = [t for t in names if t not in held]
    if missing:
        raise FeatureError(f"{aligned_dir}: no aligned features of teachers {missing}; run align")
    student_dim = model_config(meta["model"])["embed_dim"]
    wrong = {t: held[t]["dim"] for t in names if held[t]["dim"] != student_dim}
    if wrong:
        raise FeatureError(f"aligned teacher dims {wrong} != student embed_dim {student_dim}; re-run align for "
                           "this student")
    targets = TeacherFeatures(store, [(t, held[t]["version"]) for t in names],
                              np.array([r["key"] for r in records], dtype="S32"))
    eligible, orphans = eligibility(records, targets.available, domains, cfg.route_by_modality)
    icl_logit = torch.nn.Parameter(torch.tensor(math.log(1.0 / cfg.icl_init_temperature), device=device),
                                   requires_grad=cfg.learn_icl_temperature)
    sampler = TeacherSampler(eligible, seed + 1)
    drawn = torch.zeros(len(names), dtype=torch.long)

    def step(m, x, tok, idx):
        choice = sampler.draw(idx)
        drawn.add_(torch.bincount(choice, minlength=len(names)))
        t_img, t_txt = (torch.from_numpy(a).to(device) for a in targets.chosen(idx.numpy(), choice.numpy()))
        s_img = m.encode_image(x, normalize=True).float()
        s_txt = m.encode_text(tok, normalize=True).float()
        icl_scale = icl_logit.clamp(0, MAX_LOGIT_SCALE).exp()
        loss, parts = distillation_loss(s_img, s_txt, t_img, t_txt, m.logit_scale.exp(), icl_scale,
                                        cfg.fd_weight, cfg.icl_weight)
        return loss, {**parts, "icl_temperature": 1.0 / icl_scale.item()}

    tokens = tokenize_all(open_clip.get_tokenizer(meta["model"]), [r["caption"] for r in records])
    history = train(model, images, tokens, cfg.train, step, seed, device, "distill", log,
                    extra_params=[icl_logit] if cfg.learn_icl_temperature else None)
    store.close()
    share = (drawn.float() / drawn.sum().clamp(min=1)).tolist()
    history.update({f"teacher_share_{t}": s for t, s in zip(names, share)})
    history["orphan_samples"] = orphans
    save_checkpoint(model, out_dir, meta["model"], {"stage": 2, "teachers": names,
                                                   "icl_temperature": float(1.0 / icl_logit.exp().item())})
    return history
