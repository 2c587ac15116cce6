"""Owns the evaluation's plots: CSV (DVC plots) and PNG (MLflow artifacts) of the student against the best
teacher and of each model's mean headline metric per task."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mmkd import atomic
from mmkd.evaluation.report import HEADLINES, comparisons


def student_vs_best_teacher(plan: dict, results: dict, student: str = "student") -> list[dict]:
    teachers = [m["name"] for m in plan["models"] if m["kind"] == "teacher" and m["name"] in results]
    out = []
    for r in comparisons(plan, results):
        if student not in r["values"]:
            continue
        tv = {t: r["values"][t][0] for t in teachers if t in r["values"]}
        if not tv:
            continue
        best = max(tv, key=tv.get)
        s = r["values"][student][0]
        out.append({"label": f"{r['dataset']}:{r['metric']}", "dataset": r["dataset"], "task": r["task"],
                    "metric": r["metric"], "modality": r["modality"], "student": round(s, 4),
                    "best_teacher": best, "best_teacher_value": round(tv[best], 4),
                    "delta": round(s - tv[best], 4)})
    return out


def per_task_means(plan: dict, results: dict) -> list[dict]:
    rows = comparisons(plan, results)
    out = []
    for m in results:
        for t in HEADLINES:
            vals = [r["values"][m][0] for r in rows if r["task"] == t and m in r["values"]]
            if vals:
                out.append({"label": f"{t}: {m}", "model": m, "task": t, "value": round(float(np.mean(vals)), 4)})
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def write_plots(plan: dict, results: dict, plots_dir: Path) -> list[Path]:
    """CSV (DVC plots) and PNG (MLflow artifacts): the student minus the best teacher per dataset and metric,
    and each model's mean headline metric per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    delta, per_task = student_vs_best_teacher(plan, results), per_task_means(plan, results)
    _write_csv(plots_dir / "student_vs_best_teacher.csv", delta)
    _write_csv(plots_dir / "per_task.csv", per_task)
    paths = [plots_dir / "student_vs_best_teacher.csv", plots_dir / "per_task.csv"]
    if delta:
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(delta) + 1.2))
        ax.barh([d["label"] for d in delta], [d["delta"] for d in delta],
                color=["tab:green" if d["delta"] >= 0 else "tab:red" for d in delta])
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("student minus best teacher")
        ax.set_title("Student vs best teacher, per dataset and headline metric")
        fig.tight_layout()
        with atomic.replacing(plots_dir / "student_vs_best_teacher.png") as fh:
            fig.savefig(fh, dpi=110, format="png")
        plt.close(fig)
        paths.append(plots_dir / "student_vs_best_teacher.png")
    if per_task:
        models = list(dict.fromkeys(r["model"] for r in per_task))
        tasks = list(dict.fromkeys(r["task"] for r in per_task))
        fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.6))
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            vals = [next((r["value"] for r in per_task if r["model"] == m and r["task"] == t), np.nan) for t in tasks]
            ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
        ax.set_ylabel("mean headline metric")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        with atomic.replacing(plots_dir / "per_task.png") as fh:
            fig.savefig(fh, dpi=110, format="png")
        plt.close(fig)
        paths.append(plots_dir / "per_task.png")
    return paths
