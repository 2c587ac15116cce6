"""Owns the routed strategy's teacher weights: each teacher's probe quality per modality, softmax over it."""

from __future__ import annotations

import numpy as np


def teacher_quality(features, labels: list, modality: np.ndarray, n_modalities: int, chunk: int = 4096) -> np.ndarray:
    """[T, M] balanced accuracy of each teacher on each modality's probe samples (NaN: not measurable).

    features: raw teacher features of the probe samples (`.names`, `.available` [N, T], `.batch(idx)` ->
    {teacher: (image, text)}); labels: each sample's class (None: unlabelled); modality: [N] modality index.
    For teacher t and modality m, a class prototype is the L2-normalised mean of t's caption features of that
    class's probe samples (those t has features for); each such image is classified by its most cosine-similar
    prototype among m's classes; q[t, m] is the mean per-class recall, measurable when t has >= 2 classes of m.
    Streams twice over the probe samples in chunks (class sums, then predictions): nothing sample-sized is held.
    """
    names = list(features.names)
    n, T = len(labels), len(names)
    modality = np.asarray(modality, dtype=np.int64)
    gid = np.full(n, -1, np.int64)
    class_mod: list[int] = []
    for m in range(n_modalities):
        members = np.flatnonzero(modality == m)
        for c in sorted({labels[i] for i in members if labels[i] is not None}):
            gid[[i for i in members if labels[i] == c]] = len(class_mod)
            class_mod.append(m)
    G = len(class_mod)
    class_mod = np.asarray(class_mod, dtype=np.int64)
    quality = np.full((T, n_modalities), np.nan)
    if G == 0:
        return quality
    avail = np.asarray(features.available, dtype=bool) & (gid >= 0)[:, None]
    sums: list[np.ndarray | None] = [None] * T
    counts = np.zeros((T, G))
    chunks = [np.arange(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    for sel in chunks:  # pass 1: per-class sums of caption features
        if not avail[sel].any():
            continue
        parts = features.batch(sel)
        for j, t in enumerate(names):
            ok = avail[sel, j]
            if ok.any():
                txt, g = np.asarray(parts[t][1], np.float64)[ok], gid[sel][ok]
                if sums[j] is None:
                    sums[j] = np.zeros((G, txt.shape[1]))
                np.add.at(sums[j], g, txt)
                counts[j] += np.bincount(g, minlength=G)
    protos = [None if s is None else s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12) for s in sums]
    correct, total = np.zeros((T, G)), np.zeros((T, G))
    for sel in chunks:  # pass 2: nearest prototype of each image
        if not avail[sel].any():
            continue
        parts = features.batch(sel)
        for j, t in enumerate(names):
            ok = avail[sel, j]
            if not ok.any():
                continue
            img, g = np.asarray(parts[t][0], np.float64)[ok], gid[sel][ok]
            scores = img @ protos[j].T  # [b, G]
            allowed = (class_mod[None, :] == class_mod[g][:, None]) & (counts[j] > 0)[None, :]
            pred = np.where(allowed, scores, -np.inf).argmax(1)
            correct[j] += np.bincount(g[pred == g], minlength=G)
            total[j] += np.bincount(g, minlength=G)
    for j in range(T):
        for m in range(n_modalities):
            gs = np.flatnonzero((class_mod == m) & (total[j] > 0))
            if len(gs) >= 2:
                quality[j, m] = float(np.mean(correct[j, gs] / total[j, gs]))
    return quality


def routed_scores(quality: np.ndarray, temperature: float) -> np.ndarray:
    """[M, T] softmax logits quality[t, m] / temperature. A teacher whose quality on m was not measurable counts
    as the worst measured teacher of m (no evidence it is good there); a modality with none measured: all equal."""
    q = np.asarray(quality, dtype=np.float64).T.copy()  # [M, T]
    for m in range(len(q)):
        known = np.isfinite(q[m])
        q[m, ~known] = q[m, known].min() if known.any() else 0.0
    return q / temperature


def routed_weights(quality: np.ndarray, routed: np.ndarray, temperature: float) -> np.ndarray:
    """[M, T] the weight table: w[m, t] = softmax over the teachers routed to m of quality[t, m] / temperature,
    0 for teachers not routed to m (a modality no teacher is declared for uses every teacher, as eligibility
    does). A sample's own weights are this row renormalised over the teachers that have features for it."""
    scores = routed_scores(quality, temperature)
    routed = np.asarray(routed, dtype=bool).copy()
    routed[~routed.any(1)] = True
    s = np.where(routed, scores, -np.inf)
    s = np.exp(s - s.max(1, keepdims=True))
    return s / s.sum(1, keepdims=True)


class RowFeatures:
    """teacher_quality's features interface over one model's own embeddings (the stage-1 student's probe rows, a
    features.student StudentRows or InMemory): one 'teacher', available for every row."""

    def __init__(self, name: str, rows):
        self.names, self.rows = [name], rows
        self.available = np.ones((len(rows), 1), dtype=bool)

    def batch(self, idx) -> dict:
        return {self.names[0]: self.rows.rows(np.asarray(idx, np.int64))}


def modality_lag(quality: np.ndarray, student: np.ndarray, routed: np.ndarray) -> np.ndarray:
    """[M] how far the student is behind the best teacher declared for each modality, on the same measure
    (teacher_quality's balanced accuracy), 0 when it is not behind or either side is not measurable."""
    q = np.where(np.asarray(routed, bool).T, np.asarray(quality, np.float64), np.nan)  # [T, M]
    best = np.array([np.nanmax(col) if np.isfinite(col).any() else np.nan for col in q.T])
    lag = best - np.asarray(student, np.float64)
    return np.where(np.isfinite(lag), np.clip(lag, 0.0, None), 0.0)


def focus_factors(lag: np.ndarray, sample_modality: np.ndarray, focus: float) -> np.ndarray:
    """[M] each modality's distillation weight factor, 1 + focus * lag[m], scaled so that the mean factor over the
    train samples is 1 (the total distillation weight is unchanged; it moves toward the lagging modalities)."""
    raw = 1.0 + float(focus) * np.asarray(lag, np.float64)
    counts = np.bincount(np.asarray(sample_modality, np.int64), minlength=len(raw))
    mean = float(raw @ counts) / max(1, int(counts.sum()))
    return raw / mean


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int, folds: int = 5, ridge: float = 1.0) -> float:
    """Cross-validated balanced accuracy of a linear probe on `features` (rows L2-normalised): a ridge classifier
    (least squares onto one-hot classes, closed form: fast and deterministic), `folds` seeded folds. NaN when fewer
    than 2 classes have 2 samples each. sampling_focus's measure of what a linear probe gets out of an embedding."""
    x = np.asarray(features, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2 or (np.bincount(y) >= 2).sum() < 2:
        return float("nan")
    fold = np.random.default_rng(seed).permutation(len(y)) % max(2, min(folds, len(y)))
    pred = np.empty(len(y), np.int64)
    for k in np.unique(fold):
        fit, held = fold != k, fold == k
        mean = x[fit].mean(0)
        xf = x[fit] - mean
        target = np.eye(len(classes))[y[fit]]
        prior = target.mean(0)  # the intercept: least squares with one, as scikit-learn's RidgeClassifier fits
        w = np.linalg.solve(xf.T @ xf + ridge * np.eye(x.shape[1]), xf.T @ (target - prior))
        pred[held] = ((x[held] - mean) @ w + prior).argmax(1)
    recall = [np.mean(pred[y == c] == c) for c in range(len(classes))]
    return float(np.mean(recall))


def probe_lag(teacher_images: dict[str, np.ndarray], student_images: np.ndarray, labels: np.ndarray,
              modality: np.ndarray, n_modalities: int, routed: np.ndarray, names: list[str], seed: int) -> tuple:
    """[M] lag, [T, M] teacher probe accuracy, [M] student probe accuracy (probe_accuracy on each modality's
    labelled samples): the lag is how far the student's image embedding is behind the best teacher declared for
    the modality (modality_lag). teacher_images: each teacher's raw image features of the same samples (rows
    it lacks are NaN and skipped)."""
    labels, modality = np.asarray(labels, dtype=object), np.asarray(modality, np.int64)
    q = np.full((len(names), n_modalities), np.nan)
    qs = np.full(n_modalities, np.nan)
    for m in range(n_modalities):
        rows = np.flatnonzero((modality == m) & np.array([v is not None for v in labels]))
        if len(rows) == 0:
            continue
        qs[m] = probe_accuracy(student_images[rows], labels[rows].astype(str), seed)
        for j, t in enumerate(names):
            if not routed[m, j]:
                continue
            x = teacher_images[t][rows]
            ok = np.isfinite(x).all(1)
            q[j, m] = probe_accuracy(x[ok], labels[rows][ok].astype(str), seed)
    return modality_lag(q, qs, routed), q, qs
