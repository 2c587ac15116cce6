"""Owns zero-shot prediction: label prompt ensembles, softmax at the model's logit scale, and the printed table."""

from __future__ import annotations

import numpy as np

from mmkd.evaluation.tasks.zeroshot import class_embeddings

# generic radiology/pathology phrasings; the evaluation's prompts (data/synth.py) name the modality too, which
# a user can do with --template "a chest X-ray showing {label}"
DEFAULT_TEMPLATES = (
    "{label}",
    "a medical image showing {label}",
    "a medical image with {label}",
    "an image of {label}",
    "{label} on a medical image",
)


def parse_labels(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels needs at least two comma-separated labels, got {labels}")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--labels: duplicate labels {dup}")
    return labels


def prompts(label: str, templates=DEFAULT_TEMPLATES) -> list[str]:
    """Every template filled with the label (underscores read as spaces: `liver_lesion` -> `liver lesion`)."""
    what = label.replace("_", " ")
    out = []
    for t in templates:
        if "{label}" not in t:
            raise ValueError(f"template {t!r} has no {{label}} placeholder")
        out.append(t.replace("{label}", what))
    return out


def label_embeddings(encoder, labels: list[str], templates=DEFAULT_TEMPLATES) -> np.ndarray:
    """One unit vector per label: the mean of its normalised prompt embeddings, re-normalised (as evaluation does)."""
    per_label = [prompts(label, templates) for label in labels]
    emb = encoder.encode_texts([p for ps in per_label for p in ps])
    k = len(templates)
    return class_embeddings([emb[i * k:(i + 1) * k] for i in range(len(labels))])


def probabilities(image_emb: np.ndarray, label_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale * cosine) over the labels, per image."""
    logits = logit_scale * np.asarray(image_emb, np.float64) @ np.asarray(label_emb, np.float64).T
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def predict(loaded, images: list[np.ndarray], labels: list[str], templates=DEFAULT_TEMPLATES) -> np.ndarray:
    """(n_images, n_labels) probabilities of RGB images (any size) under a LoadedModel."""
    image_emb = loaded.encoder.encode_pil(images)
    return probabilities(image_emb, label_embeddings(loaded.encoder, labels, templates), loaded.logit_scale)


def as_records(names: list[str], labels: list[str], probs: np.ndarray, top_k: int | None = None) -> list[dict]:
    k = min(top_k or len(labels), len(labels))
    out = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")[:k]
        out.append({"input": name, "prediction": labels[int(order[0])],
                    "probabilities": {lab: float(v) for lab, v in zip(labels, p)},
                    "top": [{"label": labels[int(i)], "probability": float(p[i])} for i in order]})
    return out


def table(records: list[dict], labels: list[str], top_k: int | None = None) -> str:
    """One row per image: a column per label (the argmax starred), or with top_k the k best `label p`."""
    width = max([len("input")] + [len(r["input"]) for r in records])
    if top_k:
        k = min(top_k, len(labels))
        cols = [f"top{i + 1}" for i in range(k)]
        cells = [[f"{t['label']} {t['probability']:.3f}" for t in r["top"][:k]] for r in records]
    else:
        cols = list(labels)
        cells = [[f"{r['probabilities'][lab]:.3f}" + ("*" if lab == r["prediction"] else " ") for lab in labels]
                 for r in records]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    lines = ["  ".join([f"{'input':<{width}}"] + [f"{c:>{w}}" for c, w in zip(cols, widths)])]
    for r, row in zip(records, cells):
        lines.append("  ".join([f"{r['input']:<{width}}"] + [f"{v:>{w}}" for v, w in zip(row, widths)]))
    return "\n".join(lines)
