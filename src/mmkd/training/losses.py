"""Owns every loss: symmetric InfoNCE (stage 1) and the FD + ICL distillation terms (stage 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of unit embeddings; logit_scale is already exp()'d."""
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def feature_distillation(s_img, s_txt, t_img, t_txt) -> torch.Tensor:
    """FD: MSE between the student's and the (normalised, projected) teacher embeddings."""
    return F.mse_loss(s_img, t_img) + F.mse_loss(s_txt, t_txt)


def interactive_contrastive(s_img, s_txt, t_img, t_txt, scale: torch.Tensor) -> torch.Tensor:
    """ICL: the student's image contrasted against teacher texts, and its text against teacher images."""
    labels = torch.arange(len(s_img), device=s_img.device)
    return 0.5 * (F.cross_entropy(scale * s_img @ t_txt.t(), labels) + F.cross_entropy(scale * s_txt @ t_img.t(), labels))


def distillation_loss(s_img, s_txt, t_img, t_txt, logit_scale, icl_scale, fd_weight: float, icl_weight: float):
    """task InfoNCE + fd_weight * FD + icl_weight * ICL; returns (total, parts) with parts detached."""
    task = clip_loss(s_img, s_txt, logit_scale)
    fd = feature_distillation(s_img, s_txt, t_img, t_txt)
    icl = interactive_contrastive(s_img, s_txt, t_img, t_txt, icl_scale)
    total = task + fd_weight * fd + icl_weight * icl
    return total, {"loss_task": task.item(), "loss_fd": fd.item(), "loss_icl": icl.item()}
