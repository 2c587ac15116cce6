"""Owns every loss: symmetric InfoNCE (stage 1) and the stage-2 distillation terms (FD, ICL, relational KD, image
structure).

Conventions (open_clip style: plain functions of tensors, no state):
- student and teacher features are unit-norm, float32; `logit_scale` / `scale` are already exp()'d multipliers;
- the multi-teacher forms take teacher features stacked [B, T, D] with a mask [B, T] (teacher t has features
  for sample i and may supervise it) and return per-(sample, teacher) terms [B, T], zero where masked; a
  strategy combines them with weights W [B, T] via `weighted_mean`: (1/B) sum_i sum_t W[i, t] term[i, t].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# FD is scaled so that `fd_weight` means what it means in the reference recipe, whose student is 512-d.
FD_REFERENCE_DIM = 512


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of unit embeddings; logit_scale is already exp()'d."""
    logits = logit_scale * img @ txt.t()
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ---------------------------------------------------------------------------------------------- FD


def fd_per_sample(s_img, s_txt, t_img, t_txt, reference_dim: int = FD_REFERENCE_DIM) -> torch.Tensor:
    """[B] (or [B, T] for teachers stacked [B, T, D]): (|s_img - t_img|^2 + |s_txt - t_txt|^2) / reference_dim.

    The reference's FD is F.mse_loss(img) + F.mse_loss(txt) on a 512-d student, i.e. the squared error summed
    over dimensions divided by 512; dividing by a fixed reference_dim (not the student's own D, as mse_loss
    would) keeps fd_weight's strength relative to InfoNCE independent of the student's width.
    """
    if t_img.dim() == 3:
        s_img, s_txt = s_img[:, None], s_txt[:, None]
    return ((s_img - t_img).pow(2).sum(-1) + (s_txt - t_txt).pow(2).sum(-1)) / reference_dim


def feature_distillation(s_img, s_txt, t_img, t_txt, reference_dim: int = FD_REFERENCE_DIM) -> torch.Tensor:
    """FD against one teacher target per sample: the batch mean of fd_per_sample (= the reference at 512-d)."""
    return fd_per_sample(s_img, s_txt, t_img, t_txt, reference_dim).mean()


# ---------------------------------------------------------------------------------------------- ICL


def interactive_contrastive(s_img, s_txt, t_img, t_txt, scale: torch.Tensor) -> torch.Tensor:
    """ICL (reference, one target per sample): the student's images contrasted against the targets' texts and its
    texts against the targets' images, over the whole batch: 1/2 [CE(scale s_img t_txt^T) + CE(scale s_txt t_img^T)]."""
    labels = torch.arange(len(s_img), device=s_img.device)
    return 0.5 * (F.cross_entropy(scale * s_img @ t_txt.t(), labels) + F.cross_entropy(scale * s_txt @ t_img.t(), labels))


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim of logits [T, B, B] restricted to the columns where mask [T, B] is true.
    Masked columns get a huge finite negative (not -inf): rows with nothing allowed stay finite, and so do their
    gradients, which the caller zeroes."""
    fill = torch.finfo(logits.dtype).min / 4
    return logits.masked_fill(~mask[:, None, :], fill).log_softmax(-1)


def masked_interactive_contrastive(s_img, s_txt, t_img, t_txt, mask, scale: torch.Tensor) -> torch.Tensor:
    """Per-teacher ICL with missing features: [B, T] terms for teachers stacked [B, T, D] and mask [B, T].

    For teacher t let A_t = {j : mask[j, t]}. For i in A_t:
      icl[i, t] = 1/2 [ -log softmax_{j in A_t}(scale s_img_i . t_txt_{j,t})_i - log softmax_{j in A_t}(scale s_txt_i . t_img_{j,t})_i ]
    i.e. each teacher's contrastive term over the samples it has features for (its negatives are those samples'
    targets only); 0 for i not in A_t. A teacher present for one sample only gives 0 (nothing to contrast).
    With one teacher available everywhere, the batch mean equals interactive_contrastive.
    """
    m = mask.t()  # [T, B]
    diag = torch.arange(len(s_img), device=s_img.device)
    i2t = _masked_log_softmax(scale * torch.einsum("id,jtd->tij", s_img, t_txt), m)[:, diag, diag]
    t2i = _masked_log_softmax(scale * torch.einsum("id,jtd->tij", s_txt, t_img), m)[:, diag, diag]
    return torch.where(m, -0.5 * (i2t + t2i), torch.zeros_like(i2t)).t()


# ---------------------------------------------------------------------------------------------- relational KD


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Row-wise -sum_j softmax(teacher)_j log_softmax(student)_j (open_clip DistillClipLoss.dist_loss, per row)."""
    return -(teacher_logits.softmax(-1) * student_logits.log_softmax(-1)).sum(-1)


def relational_distillation(s_img, s_txt, logit_scale, teachers: list[tuple[torch.Tensor, torch.Tensor]],
                            mask, teacher_scale: float) -> torch.Tensor:
    """Per-teacher in-batch similarity distillation: [B, T] terms, zero where mask [B, T] is false.

    teachers: per teacher its raw (native-dim, unit-norm) image and text features [B, d_t] (rows of samples it
    lacks are ignored). For teacher t and A_t = {j : mask[j, t]}, with S = logit_scale s_img s_txt^T and
    G^t = teacher_scale t_img t_txt^T, both restricted to A_t x A_t:
      kd[i, t] = 1/2 [ H(softmax(G^t_i.), log_softmax(S_i.)) + H(softmax(G^t_.i), log_softmax(S_.i)) ]
    (image->text rows, text->image columns), H the soft-target cross entropy. With one teacher available for the
    whole batch, the batch mean is open_clip's DistillClipLoss distill term.
    """
    m = mask.t()  # [T, B]
    student = logit_scale * s_img @ s_txt.t()  # [B, B]
    fill = torch.finfo(student.dtype).min / 4
    out = []
    for t, (t_img, t_txt) in enumerate(teachers):
        keep = m[t]
        if not keep.any():
            out.append(torch.zeros(len(s_img), device=s_img.device, dtype=student.dtype))
            continue
        teacher = teacher_scale * t_img @ t_txt.t()
        cols = ~keep[None, :]
        i2t = soft_cross_entropy(teacher.masked_fill(cols, fill), student.masked_fill(cols, fill))
        t2i = soft_cross_entropy(teacher.t().masked_fill(cols, fill), student.t().masked_fill(cols, fill))
        out.append(torch.where(keep, 0.5 * (i2t + t2i), torch.zeros_like(i2t)))
    return torch.stack(out, dim=1)


def image_structure(s_img, t_img, mask, same, scale: float) -> torch.Tensor:
    """Per-teacher distillation of the image-image similarity structure within a modality: [B, T] terms for
    teachers stacked t_img [B, T, D] (unit), mask [B, T] and same [B, B] (samples i and j share a modality).

    For teacher t, row i (mask[i, t]) and its candidates C_it = {j != i : mask[j, t], same[i, j]}:
      st[i, t] = H( softmax_{j in C_it}(scale t_img_i . t_img_j), log_softmax_{j in C_it}(scale s_img_i . s_img_j) )
    i.e. which of the sample's same-modality batch mates the teacher finds its neighbours, taught to the student
    (what a linear probe on the student's image embedding needs: the specialist's class structure). 0 where the
    teacher cannot supervise the sample or it has fewer than 2 candidates (nothing to rank).
    """
    n = len(s_img)
    m = mask.t()  # [T, B]
    eye = torch.eye(n, dtype=torch.bool, device=s_img.device)
    allowed = m[:, None, :] & (same & ~eye)[None]  # [T, B(rows), B(columns)]
    fill = torch.finfo(s_img.dtype).min / 4
    teacher = (scale * torch.einsum("itd,jtd->tij", t_img, t_img)).masked_fill(~allowed, fill)
    student = (scale * s_img @ s_img.t())[None].expand_as(teacher).masked_fill(~allowed, fill)
    terms = soft_cross_entropy(teacher, student)  # [T, B]
    valid = m & (allowed.sum(-1) >= 2)
    return torch.where(valid, terms, torch.zeros_like(terms)).t()


# ---------------------------------------------------------------------------------------------- combining


def weighted_mean(terms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i sum_t W[i, t] terms[i, t]: each sample's teacher weights sum to 1, so this is a batch mean."""
    return (terms * weights).sum() / len(terms)


def distillation_loss(s_img, s_txt, t_img, t_txt, logit_scale, icl_scale, fd_weight: float, icl_weight: float,
                      reference_dim: int = FD_REFERENCE_DIM):
    """Reference strategy: task InfoNCE + fd_weight * FD + icl_weight * ICL against one target per sample;
    returns (total, parts) with parts detached floats."""
    task = clip_loss(s_img, s_txt, logit_scale)
    fd = feature_distillation(s_img, s_txt, t_img, t_txt, reference_dim)
    icl = interactive_contrastive(s_img, s_txt, t_img, t_txt, icl_scale)
    total = task + fd_weight * fd + icl_weight * icl
    return total, {"loss_task": task.item(), "loss_fd": fd.item(), "loss_icl": icl.item()}
