"""Owns the MIL task: gated attention-based deep MIL (Ilse et al. 2018) over bags of frozen embeddings."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch.nn import functional as F

from mmkd.evaluation.stats import Outcome, _ovr_auc, plan_ci
from mmkd.evaluation.tasks import BOOTSTRAP_SEED, one_torch_thread


def auc_ovr(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary: AUC of the positive class; multiclass: macro one-vs-rest AUC (sklearn's roc_auc_score, by mid-ranks
    so that a thousand bootstrap resamples stay cheap). ValueError when a class is absent."""
    return _ovr_auc(prob, y)


def balanced_acc(y: np.ndarray, prob: np.ndarray) -> float:
    pred = prob.argmax(1)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def _pad(bags: list[np.ndarray], mu: np.ndarray, sd: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags standardised and zero-padded to (B, max_n, D), with the mask of real instances."""
    x = np.zeros((len(bags), max(len(b) for b in bags), len(mu)), np.float32)
    mask = np.zeros(x.shape[:2], bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = (b - mu) / sd
        mask[i, : len(b)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


def _init(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    bound = float(np.sqrt(6.0 / shape[1]))  # He-uniform from a private generator, never the global RNG
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).requires_grad_()


class _GatedAttentionMIL:
    """h = ReLU(W x); a = softmax over the bag of w . (tanh(V h) * sigmoid(U h)); z = sum a h; logits = C z."""

    def __init__(self, dim: int, n_classes: int, hidden: int, attn: int, gen: torch.Generator):
        shapes = {"W": (hidden, dim), "V": (attn, hidden), "U": (attn, hidden), "w": (1, attn),
                  "C": (n_classes, hidden)}
        self.p = {k: _init(s, gen) for k, s in shapes.items()}
        self.p.update({f"b{k}": torch.zeros(s[0], requires_grad=True) for k, s in shapes.items()})

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = self.p
        h = F.relu(F.linear(x, p["W"], p["bW"]))
        gate = torch.tanh(F.linear(h, p["V"], p["bV"])) * torch.sigmoid(F.linear(h, p["U"], p["bU"]))
        score = F.linear(gate, p["w"], p["bw"]).squeeze(-1).masked_fill(~mask, float("-inf"))
        z = (torch.softmax(score, dim=1).unsqueeze(-1) * h).sum(1)
        return F.linear(z, p["C"], p["bC"])


def _fit_predict(train: list[np.ndarray], y: np.ndarray, test: list[np.ndarray], n_classes: int, seed: int,
                 hidden: int, attn: int, epochs: int, batch: int, lr: float) -> np.ndarray:
    inst = np.concatenate(train)
    mu, sd = inst.mean(0), inst.std(0) + 1e-6  # train-fold instance statistics only
    x, mask = _pad(train, mu, sd)
    target = torch.from_numpy(np.asarray(y, dtype=np.int64))
    model = _GatedAttentionMIL(x.shape[2], n_classes, hidden, attn, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.p.values(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for s in range(0, len(order), batch):
            idx = torch.from_numpy(order[s: s + batch])
            opt.zero_grad()
            F.cross_entropy(model(x[idx], mask[idx]), target[idx]).backward()
            opt.step()
    xt, mt = _pad(test, mu, sd)
    with torch.no_grad():
        return torch.softmax(model(xt, mt), dim=1).numpy().astype(np.float64)


def mil(bags: list[np.ndarray], labels: np.ndarray, n_classes: int, seed: int, folds: int = 5, hidden: int = 128,
        attn: int = 64, epochs: int = 20, batch: int = 32, lr: float = 1e-3, head_seeds: int = 1,
        outcomes: dict | None = None) -> dict:
    """Stratified K-fold: a fresh model per outer fold, its out-of-fold class probabilities pooled and scored
    once (AUC, balanced accuracy). Repeated for `head_seeds` seeds (seed, seed+1, ...: each its own fold split
    and initialisation); every metric is the mean over seeds, its CI a bootstrap of the bags stratified by class
    (the seed-mean recomputed per resample). Bags of any size (padded and masked). outcomes: filled with
    mil_auc's Outcome (every seed's out-of-fold probabilities per bag)."""
    labels = np.asarray(labels, dtype=np.int64)
    bags = [np.asarray(b, np.float32) for b in bags]
    if any(b.ndim != 2 or len(b) == 0 for b in bags):
        raise ValueError("mil: every bag must be an (n_i, D) array with at least one instance")
    probs = np.zeros((max(1, head_seeds), len(bags), n_classes))
    with one_torch_thread():
        for r, s in enumerate(seed + k for k in range(len(probs))):
            split = StratifiedKFold(folds, shuffle=True, random_state=s).split(np.zeros(len(bags)), labels)
            for k, (tr, te) in enumerate(split):
                probs[r, te] = _fit_predict([bags[i] for i in tr], labels[tr], [bags[i] for i in te], n_classes,
                                            s * 1000 + k, hidden, attn, epochs, batch, lr)
    auc = Outcome("auc", {"scores": probs, "labels": labels}, strata=labels, design="bags, stratified by class")
    plan = auc.plan(BOOTSTRAP_SEED)
    out: dict[str, float] = {}
    for name, fn in (("mil_auc", auc_ovr), ("mil_balanced_acc", balanced_acc)):
        def stat(i, fn=fn):
            return float(np.mean([fn(labels[i], p[i]) for p in probs]))
        try:
            out[name] = stat(np.arange(len(bags)))
        except ValueError:
            out[name] = float("nan")
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = plan_ci(stat, plan)
    if outcomes is not None and np.isfinite(out["mil_auc"]):
        outcomes["mil_auc"] = auc
    out["mil_n_bags"] = len(bags)
    return out
