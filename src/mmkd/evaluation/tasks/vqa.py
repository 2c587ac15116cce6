"""Owns the closed-ended VQA task: a small fusion head on frozen image and question embeddings."""

from __future__ import annotations

import re

import numpy as np
import torch
from torch.nn import functional as F

from mmkd.evaluation.stats import Outcome
from mmkd.evaluation.tasks import BOOTSTRAP_SEED, one_torch_thread

PATIENCE = 20  # epochs without a better val score before stopping


def type_key(question_type: str) -> str:
    """`vqa_acc_<key>`: lower-case, each run of non-alphanumerics one underscore ("PRES, POS" -> pres_pos)."""
    return re.sub(r"[^0-9a-z]+", "_", question_type.lower()).strip("_") or "other"


def _normalise(answer: str) -> str:
    return " ".join(str(answer).lower().split())  # "Yes" and "yes " are one answer


def _init(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    # He-uniform from a private generator: no global RNG, so concurrent calls cannot disturb each other
    bound = float(np.sqrt(6.0 / shape[1]))
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).requires_grad_()


def _train_head(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None, yv: torch.Tensor | None,
                n_out: int, seed: int, hidden: int, epochs: int, lr: float, weight_decay: float):
    """Full-batch AdamW on an MLP [x] -> hidden (ReLU) -> n_out; with a val split, the weights of the epoch with
    the best val accuracy (then lowest val loss) are kept, stopping after PATIENCE epochs without improvement."""
    gen = torch.Generator().manual_seed(seed)
    params = [_init((hidden, x.shape[1]), gen), torch.zeros(hidden, requires_grad=True),
              _init((n_out, hidden), gen), torch.zeros(n_out, requires_grad=True)]

    def forward(inp):
        return F.linear(F.relu(F.linear(inp, params[0], params[1])), params[2], params[3])

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, best_score, stale = [p.detach().clone() for p in params], (-1.0, 0.0), 0
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        if xv is None:
            continue
        with torch.no_grad():
            logits = forward(xv)
            # val loss breaks accuracy ties: on easy data val accuracy saturates long before the margins do
            score = (float((logits.argmax(1) == yv).float().mean()),
                     -float(F.cross_entropy(logits, yv, ignore_index=-1)) if (yv >= 0).any() else 0.0)
        if score > best_score:
            best, best_score, stale = [p.detach().clone() for p in params], score, 0
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    if xv is not None:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    return forward


def vqa(image_emb: np.ndarray, question_emb: np.ndarray, answers: list[str], question_types: list[str],
        split: np.ndarray, seed: int, image_ids=None, hidden: int = 128, epochs: int = 100, lr: float = 5e-3,
        weight_decay: float = 1e-2, outcomes: dict | None = None) -> dict:
    """Classify each question's answer from [img, q, img*q] over the answers seen in train; a test answer never
    seen in train counts as wrong. Inputs are standardised with train statistics (L2-normalised rows have tiny
    entries, and img*q tinier). image_ids: the image of each question; the CI (and every paired test) resamples
    test images, each with all its questions (None: every question its own image). outcomes: filled with
    vqa_acc's per-question Outcome."""
    split = np.asarray(split).astype(str)
    answers = [_normalise(a) for a in answers]
    img, q = np.asarray(image_emb, np.float32), np.asarray(question_emb, np.float32)
    feats = np.concatenate([img, q, img * q], axis=1)
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"vqa needs train and test questions (train {len(tr)}, test {len(te)})")
    vocab = sorted({answers[i] for i in tr})
    index = {a: i for i, a in enumerate(vocab)}
    target = np.array([index.get(a, -1) for a in answers])  # -1: unseen in train, never predicted
    mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6
    x = torch.from_numpy((feats - mu) / sd)
    # val items with an answer unseen in train still count (as wrong) in the val accuracy
    xv, yv = (x[va], torch.from_numpy(target[va])) if len(va) else (None, None)
    with one_torch_thread():
        head = _train_head(x[tr], torch.from_numpy(target[tr]), xv, yv, len(vocab), seed, hidden, epochs, lr,
                           weight_decay)
        with torch.no_grad():
            pred = head(x[te]).argmax(1).numpy()
    correct = (pred == target[te]).astype(np.float64)
    keys = np.array([type_key(question_types[i]) for i in te])
    images = np.arange(len(split)) if image_ids is None else np.asarray(image_ids)
    if len(images) != len(split):
        raise ValueError(f"vqa: {len(images)} image ids for {len(split)} questions")
    acc = Outcome("mean", {"values": correct}, clusters=images[te], design="images, each with all its questions")
    out = acc.with_ci("vqa_acc", acc.plan(BOOTSTRAP_SEED), {})
    if outcomes is not None:
        outcomes["vqa_acc"] = acc
    for k in sorted(set(keys)):
        out[f"vqa_acc_{k}"] = float(correct[keys == k].mean())
    out["vqa_n_answers"] = len(vocab)
    out["vqa_n_test"] = len(te)
    return out
