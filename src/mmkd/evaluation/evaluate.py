"""Owns the evaluation run: every model on every held-out set, written as metrics.json and a leaderboard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmkd.data.store import open_images, split_records
from mmkd.evaluation.metrics import class_embeddings, linear_probe, retrieval, zero_shot
from mmkd.evaluation.stats import mean_over_sets
from mmkd.models.encoder import ClipEncoder

HEADLINE = ("zeroshot_acc1", "probe_acc1", "i2t_r1", "t2i_r1")


@dataclass
class Candidate:
    """A model to evaluate; `cached` holds precomputed split embeddings (teachers), else they are computed."""

    name: str
    encoder: ClipEncoder
    kind: str  # "student" or "teacher"
    domain: list[str] | None = None
    cached: dict[str, dict[str, np.ndarray]] | None = None


def _split_embeddings(c: Candidate, split: str, records, curated_dir: Path, batch: int) -> tuple[np.ndarray, np.ndarray]:
    if c.cached and split in c.cached:
        return c.cached[split]["image"], c.cached[split]["text"]
    images = open_images(curated_dir, records, c.encoder.spec.size)  # at the model's own input size
    return c.encoder.encode_images(images, batch), c.encoder.encode_texts([r["caption"] for r in records], batch)


class EvaluationDataError(ValueError):
    """A held-out record lacks a usable label for its task; the message names the record."""


def task_labels(records: list[dict], sel: np.ndarray, task: dict, dataset: str) -> np.ndarray:
    """Class indices of the selected records for one task."""
    classes, key = task["classes"], task["label"]
    out = []
    for r in (r for r, keep in zip(records, sel) if keep):
        value = r.get("labels", {}).get(key)
        if value not in classes:
            raise EvaluationDataError(f"record '{r['id']}' ({r['split']}): label '{key}'={value!r} is not one of "
                                      f"{dataset}'s classes {classes}")
        out.append(classes.index(value))
    return np.array(out, dtype=int)


def evaluate(candidates: list[Candidate], curated_dir: Path, tasks: dict, recall_k: list[int], probe_c: float,
             seed: int, batch: int = 256) -> dict:
    """model -> dataset -> metric. Datasets are the held-out test sets, one per modality, plus `mean`."""
    test_rec, probe_rec = split_records(curated_dir, "test"), split_records(curated_dir, "probe")
    # labels depend on the task only: resolve (and check) them once, not once per model
    selections = {}
    for dataset, task in tasks.items():
        sel = np.array([r["modality"] == task["modality"] for r in test_rec])
        psel = np.array([r["modality"] == task["modality"] for r in probe_rec])
        if sel.any():
            selections[dataset] = (sel, psel, task_labels(test_rec, sel, task, dataset),
                                   task_labels(probe_rec, psel, task, dataset))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for c in candidates:
        te_i, te_t = _split_embeddings(c, "test", test_rec, curated_dir, batch)
        pr_i, _ = _split_embeddings(c, "probe", probe_rec, curated_dir, batch)
        per: dict[str, dict[str, float]] = {}
        for dataset, (sel, psel, y, py) in selections.items():
            task = tasks[dataset]
            classes = task["classes"]
            cls = class_embeddings([c.encoder.encode_texts(task["prompts"][k], batch) for k in classes])
            m = zero_shot(te_i[sel], cls, y)
            if psel.any() and len(np.unique(py)) > 1:
                m.update(linear_probe(pr_i[psel], py, te_i[sel], y, len(classes), probe_c, seed))
            m.update(retrieval(te_i[sel], te_t[sel], recall_k))
            m["n_test"] = int(sel.sum())
            m["in_domain"] = float(c.domain is None or task["modality"] in c.domain)
            per[dataset] = m
        per["mean"] = mean_over_sets(per)
        results[c.name] = per
    return results


def leaderboard(results: dict, candidates: list[Candidate]) -> str:
    """Markdown: mean headline metrics per model, then zero-shot acc1 per held-out set."""
    kinds = {c.name: c for c in candidates}
    datasets = [d for d in next(iter(results.values())) if d != "mean"]
    order = sorted(results, key=lambda n: -results[n]["mean"]["zeroshot_acc1"])
    lines = ["# Leaderboard", "", "Held-out test sets of the embedded corpus, one per modality. "
             "Means are over all sets, so a specialist teacher's mean counts the sets outside its domain. "
             "metrics.json gives each set's accuracies a 95% CI (stratified bootstrap, 1000 resamples, seed 42) "
             "and each mean the number of sets it covers (`<metric>_n_sets`).", "",
             "| model | kind | domain | " + " | ".join(f"mean {h}" for h in HEADLINE) + " |",
             "|---|---|---|" + "---|" * len(HEADLINE)]
    for n in order:
        c = kinds[n]
        dom = ", ".join(c.domain) if c.domain else "all"
        vals = " | ".join(f"{results[n]['mean'].get(h, float('nan')):.3f}" for h in HEADLINE)
        lines.append(f"| {n} | {c.kind} | {dom} | {vals} |")
    students = [n for n in order if kinds[n].kind == "student"]
    teachers = [n for n in order if kinds[n].kind == "teacher" and kinds[n].domain]
    if teachers and students:
        lines += ["", "## On each teacher's own domain (mean over its in-domain sets)", "",
                  "| domain of | sets | metric | teacher | " + " | ".join(students) + " |",
                  "|---|---|---|---|" + "---|" * len(students)]
        for t in teachers:
            own = [d for d in datasets if results[t][d].get("in_domain")]
            for h in ("zeroshot_acc1", "probe_acc1"):
                def mean(n):
                    return np.mean([results[n][d].get(h, np.nan) for d in own])
                lines.append(f"| {t} | {len(own)} | {h} | {mean(t):.3f} | " + " | ".join(f"{mean(s):.3f}" for s in students) + " |")
    lines += ["", "## Zero-shot acc1 per held-out set (* = inside the model's training domain)", "",
              "| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for n in order:
        cells = []
        for d in datasets:
            m = results[n].get(d, {})
            star = "*" if m.get("in_domain") and kinds[n].domain else ""
            cells.append(f"{m.get('zeroshot_acc1', float('nan')):.3f}{star}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict, board: str, metrics_path: Path, leaderboard_path: Path) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(results, indent=1, sort_keys=True))
    leaderboard_path.write_text(board)
