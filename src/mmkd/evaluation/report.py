"""Owns the evaluation's reports: metrics.json, the CI-aware leaderboard, and the plots (DVC and MLflow)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from mmkd.evaluation.stats import mean_over_sets
from mmkd import atomic

# the metrics each task is judged by, in the leaderboard, win/tie/loss counts and ranks (first one present)
HEADLINES: dict[str, tuple[tuple[str, ...], ...]] = {
    "zeroshot": (("zeroshot_acc1", "zeroshot_auc_macro"),),
    "probe": (("probe_acc1", "probe_auc_macro"),),
    "retrieval": (("i2t_r1",), ("t2i_r1",)),
    "vqa": (("vqa_acc",),),
    "survival": (("cindex_harrell",),),
    "mil": (("mil_auc",),),
}
# facts about one set's evaluation (sizes, counts, the chosen regularisation), not scores: never averaged
PER_SET_ONLY = ("n_test", "in_domain", "probe_c", "cindex_alpha", "cindex_harrell_folds", "cindex_uno_folds",
                "mil_n_bags", "vqa_n_answers", "vqa_n_test", "retrieval_n_unique_captions")


def _metric(per: dict, dataset: str, alts: tuple[str, ...]) -> str | None:
    m = per.get(dataset, {})
    return next((a for a in alts if a in m), None)


def comparisons(plan: dict, results: dict) -> list[dict]:
    """One row per (dataset, task, headline metric) that at least one model reports: each model's value and CI."""
    rows = []
    for d in plan["datasets"]:
        for task in d["tasks"]:
            for alts in HEADLINES[task]:
                metric = next((_metric(results[m], d["name"], alts) for m in results
                               if _metric(results[m], d["name"], alts)), None)
                if metric is None:
                    continue
                values = {}
                for model, per in results.items():
                    m = per.get(d["name"], {})
                    if metric in m:
                        values[model] = (m[metric], m.get(f"{metric}_ci_low", np.nan), m.get(f"{metric}_ci_high", np.nan))
                rows.append({"dataset": d["name"], "task": task, "metric": metric, "modality": d["modality"],
                             "values": values})
    return rows


def outcome(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """win / tie / loss of a against b: a tie when the two 95% CIs overlap (conservative), else by value.
    Without CIs, only equal values tie."""
    (va, la, ha), (vb, lb, hb) = a, b
    if all(np.isfinite([la, ha, lb, hb])):
        if la <= hb and lb <= ha:
            return "tie"
    elif va == vb:
        return "tie"
    return "win" if va > vb else "loss"


def mean_ranks(rows: list[dict], models: list[str]) -> dict[str, float]:
    """Each model's rank (1 = best, ties averaged) per comparison it takes part in, averaged."""
    ranks: dict[str, list[float]] = {m: [] for m in models}
    for r in rows:
        names = [m for m in models if m in r["values"]]
        if len(names) < 2:
            continue
        r_ = rankdata([-r["values"][m][0] for m in names], method="average")
        for m, k in zip(names, r_):
            ranks[m].append(float(k))
    return {m: float(np.mean(v)) if v else float("nan") for m, v in ranks.items()}


def win_tie_loss(rows: list[dict], student: str, teacher: str, key=None) -> dict:
    """{group: {win, tie, loss}}; key(row) groups the comparisons (None: one group, 'all')."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        if student in r["values"] and teacher in r["values"]:
            g = key(r) if key else "all"
            cell = out.setdefault(g, {"win": 0, "tie": 0, "loss": 0})
            cell[outcome(r["values"][student], r["values"][teacher])] += 1
    return out


def metrics_json(results: dict) -> dict:
    """model -> dataset -> metric, plus each model's `mean` over datasets (union of metric names, with counts)."""
    return {m: {**per, "mean": mean_over_sets(per, skip=PER_SET_ONLY)} for m, per in results.items()}


def _fmt(v: tuple[float, float, float] | None) -> str:
    if v is None:
        return "-"
    val, lo, hi = v
    return f"{val:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{val:.3f}"


def _wtl(c: dict | None) -> str:
    return f"{c['win']}/{c['tie']}/{c['loss']}" if c else "-"


def leaderboard(plan: dict, results: dict, status: dict) -> str:
    models = [m["name"] for m in plan["models"] if m["name"] in results]
    kinds = {m["name"]: m for m in plan["models"]}
    teachers = [m for m in models if kinds[m]["kind"] == "teacher"]
    student = "student" if "student" in models else None
    rows = comparisons(plan, results)
    ranks = mean_ranks(rows, models)
    tasks = [t for t in HEADLINES if any(r["task"] == t for r in rows)]
    lines = ["# Leaderboard", "",
             f"{len(plan['datasets'])} datasets evaluated, {len(models)} models, tasks: {', '.join(tasks)}. "
             "Every value is followed by its 95% CI (stratified bootstrap, 1000 resamples, seed 42; survival: "
             "spread of the cross-validation folds). Win/tie/loss: a tie when the two CIs overlap, so only "
             "differences outside the noise count. Ranks: 1 = best, averaged over every (dataset, headline "
             "metric).", "",
             "## Models", "",
             "| model | kind | domain | mean rank | " + " | ".join(f"{t} (mean)" for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for m in sorted(models, key=lambda n: ranks[n] if np.isfinite(ranks[n]) else 1e9):
        dom = ", ".join(kinds[m].get("domain") or []) or "all"
        cells = []
        for t in tasks:
            vals = [r["values"][m][0] for r in rows if r["task"] == t and m in r["values"]]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        lines.append(f"| {m} | {kinds[m]['kind']} | {dom} | {ranks[m]:.2f} | " + " | ".join(cells) + " |")
    if student and teachers:
        lines += ["", f"## {student} vs each teacher: win/tie/loss", "",
                  "| teacher | all | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for t in teachers:
            by_task = win_tie_loss(rows, student, t, key=lambda r: r["task"])
            lines.append(f"| {t} | {_wtl(win_tie_loss(rows, student, t).get('all'))} | "
                         + " | ".join(_wtl(by_task.get(k)) for k in tasks) + " |")
        mods = sorted({r["modality"] for r in rows})
        lines += ["", f"### By modality (win/tie/loss of {student})", "",
                  "| teacher | " + " | ".join(mods) + " |", "|---|" + "---|" * len(mods)]
        for t in teachers:
            by_mod = win_tie_loss(rows, student, t, key=lambda r: r["modality"])
            lines.append(f"| {t} | " + " | ".join(_wtl(by_mod.get(k)) for k in mods) + " |")
    for t in tasks:
        task_rows = [r for r in rows if r["task"] == t]
        lines += ["", f"## {t}", "", "| dataset | metric | " + " | ".join(models) + " |",
                  "|---|---|" + "---|" * len(models)]
        for r in task_rows:
            best = max(v[0] for v in r["values"].values())
            cells = []
            for m in models:
                v = r["values"].get(m)
                text = _fmt(v)
                cells.append(f"**{text}**" if v is not None and v[0] == best else text)
            lines.append(f"| {r['dataset']} | {r['metric']} | " + " | ".join(cells) + " |")
    lines += ["", f"Evaluation id `{status.get('evaluation_id')}` (datasets, sizes and task settings; the promotion "
              "gate compares scores of one id only)."]
    if status.get("missing") or status.get("failed") or status.get("rejected_records"):
        lines += ["", "## Not evaluated", ""]
        lines += [f"- {d}: missing ({why})" for d, why in sorted(status.get("missing", {}).items())]
        lines += [f"- {p}: failed ({why})" for p, why in sorted(status.get("failed", {}).items())]
        lines += [f"- {d}: {n} records refused by the loader (reasons: artifacts/evaluation/rejected/{d}.jsonl)"
                  for d, n in sorted(status.get("rejected_records", {}).items())]
    return "\n".join(lines) + "\n"


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


def evaluation_id(plan: dict, results: dict) -> str:
    """What the scores were measured on: every dataset with its tasks and test size, and the task settings. Scores
    of two evaluations are comparable only when their ids are equal (the promotion gate checks); regenerating the
    suite with the same params keeps the id."""
    sizes: dict[str, float] = {}
    for per in results.values():
        for d, m in per.items():
            sizes.setdefault(d, m.get("n_test"))
    key = {"datasets": [[d["name"], d["tasks"], sizes.get(d["name"])] for d in plan["datasets"]],
           "settings": plan.get("settings")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_results(results_dir: Path, plan: dict) -> tuple[dict, dict]:
    """(model -> dataset -> metrics, failures 'model/dataset' -> reason) from the per-pair result files."""
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    domains = {m["name"]: m.get("domain") for m in plan["models"]}
    for m in plan["models"]:
        for d in plan["datasets"]:
            path = Path(results_dir) / m["name"] / f"{d['name']}.json"
            if not path.exists():
                failed[f"{m['name']}/{d['name']}"] = "no result (the unit did not finish)"
                continue
            res = json.loads(path.read_text())
            if res.get("error"):
                failed[f"{m['name']}/{d['name']}"] = res["error"]
                continue
            dom = domains[m["name"]]
            in_domain = dom is None or bool(set(dom) & set(d["modalities"]))
            results.setdefault(m["name"], {})[d["name"]] = {**res["metrics"], "in_domain": float(in_domain)}
    return results, failed


def write_reports(plan: dict, results_dir: Path, metrics_path: Path, leaderboard_path: Path, plots_dir: Path,
                  status_path: Path, rejected_dir: Path | None = None) -> dict:
    """rejected_dir: <dataset>.jsonl of the records each loader refused, with reasons (counted in the status)."""
    results, failed = load_results(results_dir, plan)
    rejected = {p.stem: sum(1 for _ in open(p)) for p in sorted(Path(rejected_dir).glob("*.jsonl"))} \
        if rejected_dir else {}
    status = {"evaluation_id": evaluation_id(plan, results), "missing": plan["missing"], "failed": failed,
              "rejected_records": rejected}
    metrics = metrics_json(results)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(metrics_path, metrics, sort_keys=True)
    atomic.write_text(leaderboard_path, leaderboard(plan, results, status))
    plots = write_plots(plan, results, plots_dir)
    atomic.write_json(status_path, {**status, "plan": plan}, sort_keys=True)
    return {"metrics": metrics, "status": status, "plots": plots}
