"""Owns the task metrics, defined as LAION CLIP_benchmark does: acc1, mean per-class recall, recall@k."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score

from mmkd.evaluation.stats import bootstrap_accuracy_ci

BOOTSTRAP_SEED = 42  # the reference's; fixed, so a CI repeats exactly


def classification_metrics(logits: np.ndarray, y: np.ndarray, n_classes: int, prefix: str) -> dict:
    pred = logits.argmax(1)
    recalls = [float((pred[y == c] == c).mean()) for c in range(n_classes) if (y == c).any()]
    out = {
        f"{prefix}_acc1": float((pred == y).mean()),
        f"{prefix}_mean_recall": float(np.mean(recalls)),
        f"{prefix}_f1_macro": float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
    }
    low, high = bootstrap_accuracy_ci(pred == y, y, BOOTSTRAP_SEED)
    out[f"{prefix}_acc1_ci_low"], out[f"{prefix}_acc1_ci_high"] = low, high
    if len(np.unique(y)) == n_classes and n_classes > 1:
        z = logits - logits.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        out[f"{prefix}_auc_macro"] = float(roc_auc_score(y, prob, multi_class="ovr", average="macro")
                                           if n_classes > 2 else roc_auc_score(y, prob[:, 1]))
    return out


def zero_shot(img: np.ndarray, class_emb: np.ndarray, y: np.ndarray) -> dict:
    """class_emb: one unit vector per class (its prompts averaged and re-normalised)."""
    return classification_metrics(100.0 * img @ class_emb.T, y, len(class_emb), "zeroshot")


def class_embeddings(prompt_emb: list[np.ndarray]) -> np.ndarray:
    means = np.stack([e.mean(0) for e in prompt_emb])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def linear_probe(train_x, train_y, test_x, test_y, n_classes: int, c: float, seed: int) -> dict:
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit(train_x, train_y)
    logits = clf.decision_function(test_x)
    if logits.ndim == 1:  # binary: sklearn returns one column
        logits = np.stack([-logits, logits], 1)
    full = np.full((len(test_x), n_classes), -1e9)
    full[:, clf.classes_] = logits
    return classification_metrics(full, test_y, n_classes, "probe")


def retrieval(img: np.ndarray, txt: np.ndarray, ks: list[int]) -> dict:
    """Paired rows are the positives; a query hits when its positive ranks within the top k."""
    sim = img @ txt.T
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        own = np.diag(s)
        rank = (s > own[:, None]).sum(1)  # 0-based rank of the positive
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).mean())
        out[f"{name}_median_rank"] = float(np.median(rank + 1))
        out[f"{name}_mean_rank"] = float(np.mean(rank + 1))
    return out
