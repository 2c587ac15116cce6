"""Owns the leaderboard's markdown: models and ranks, paired win/tie/loss, the distillation gain, per-task tables,
with one legend saying which test each number uses."""

from __future__ import annotations

import numpy as np

from mmkd.evaluation.report import BOOTSTRAP_SEED, HEADLINES, comparisons, mean_ranks, win_tie_loss
from mmkd.evaluation.stats import RESAMPLES, verdict


def _fmt(v: tuple[float, float, float] | None) -> str:
    if v is None:
        return "-"
    val, lo, hi = v
    return f"{val:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{val:.3f}"


def _wtl(c: dict | None) -> str:
    return f"{c['win']}/{c['tie']}/{c['loss']}" if c else "-"


def _diff(res: dict | None) -> str:
    if res is None:
        return "-"
    ci = f" [{res['low']:+.3f}, {res['high']:+.3f}]" if np.isfinite(res["low"]) else ""
    return f"{res['diff']:+.3f}{ci} {res['verdict']}"


def legend(rows: list[dict], designs: dict[str, set[str]], settings: dict | None) -> list[str]:
    """Which test each number uses: one line per task present."""
    seeds = (settings or {}).get("head_seeds")
    lines = [f"Every value: 95% percentile-bootstrap CI ({RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). Win/tie/loss "
             f"and gains: paired bootstrap of the difference, {RESAMPLES} resamples, the same resamples for both "
             "models, the same as each value's own CI; a win (loss) when the 95% CI of the difference is above "
             "(below) 0, else a tie.", ""]
    for t in dict.fromkeys(r["task"] for r in rows):
        clusters = "; ".join(sorted(designs.get(t, set()))) or "no per-item outcomes: not tested"
        extra = f"; heads over {seeds} seeds, their mean" if t in ("probe", "mil") and seeds else ""
        extra += "; Harrell's C of out-of-fold risks" if t == "survival" else ""
        lines.append(f"- {t}: paired bootstrap of the difference, {RESAMPLES} resamples, clusters: {clusters}{extra}")
    return lines


def leaderboard(plan: dict, results: dict, status: dict, rows: list[dict] | None = None,
                designs: dict[str, set[str]] | None = None, gain_: dict | None = None) -> str:
    """rows: comparisons() with their paired tests (paired.add_paired); designs: task -> what its resamples draw."""
    models = [m["name"] for m in plan["models"] if m["name"] in results]
    kinds = {m["name"]: m for m in plan["models"]}
    teachers = [m for m in models if kinds[m]["kind"] == "teacher"]
    student = "student" if "student" in models else None
    rows = comparisons(plan, results) if rows is None else rows
    ranks = mean_ranks(rows, models)
    tasks = [t for t in HEADLINES if any(r["task"] == t for r in rows)]
    lines = ["# Leaderboard", "",
             f"{len(plan['datasets'])} datasets evaluated, {len(models)} models, tasks: {', '.join(tasks)}. "
             "Ranks: 1 = best, averaged over every (dataset, headline metric).", "",
             *legend(rows, designs or {}, plan.get("settings")), "",
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
    if gain_:
        lines += _gain_section(gain_, rows)
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
    lines += _data_checks_section(status.get("data_checks") or {})
    lines += ["", f"Evaluation id `{status.get('evaluation_id')}` (a fingerprint of every dataset's contents, its "
              "tasks and the task settings: scores under two ids are not comparable). The promotion gate does not use these "
              "test scores: it compares challenger and champion on the val split (README, The promotion gate)."]
    if status.get("missing") or status.get("failed") or status.get("rejected_records"):
        lines += ["", "## Not evaluated", ""]
        lines += [f"- {d}: missing ({why})" for d, why in sorted(status.get("missing", {}).items())]
        lines += [f"- {p}: failed ({why})" for p, why in sorted(status.get("failed", {}).items())]
        lines += [f"- {d}: {n} records refused by the loader (reasons: artifacts/evaluation/rejected/{d}.jsonl)"
                  for d, n in sorted(status.get("rejected_records", {}).items())]
    return "\n".join(lines) + "\n"


def _gain_section(gain_: dict, rows: list[dict]) -> list[str]:
    """The distillation gain: student minus student_stage1 per set (zero-shot and probe) and its mean."""
    lines = ["", "## Distillation gain: student minus student_stage1", "",
             "Paired bootstrap of the difference on the same resamples; the mean over sets resamples every set "
             "at once.", "", "| dataset | metric | gain [95% CI] |", "|---|---|---|"]
    for r in rows:
        m = gain_.get(r["dataset"], {})
        if r["metric"] in m:
            res = {"diff": m[r["metric"]], "low": m[f"{r['metric']}_ci_low"], "high": m[f"{r['metric']}_ci_high"]}
            lines.append(f"| {r['dataset']} | {r['metric']} | {_diff({**res, 'verdict': verdict(res)})} |")
    for metric, v in sorted(gain_.get("mean", {}).items()):
        if metric.endswith(("_ci_low", "_ci_high", "_n_sets")):
            continue
        res = {"diff": v, "low": gain_["mean"][f"{metric}_ci_low"], "high": gain_["mean"][f"{metric}_ci_high"]}
        lines.append(f"| **mean over {gain_['mean'][f'{metric}_n_sets']} sets** | {metric} | "
                     f"**{_diff({**res, 'verdict': verdict(res)})}** |")
    return lines


def _data_checks_section(checks: dict) -> list[str]:
    """The evaluated images found in the curated store (train: the scores above are suspect), and the datasets
    whose splits are not by patient (a patient's images may sit in train and test)."""
    if not checks:
        return []
    lines = ["", "## The evaluation data", ""]
    c = checks.get("contamination") or {}
    if "error" in c:
        lines.append(f"- Contamination: not checked ({c['error']}).")
    elif c:
        t = c["totals"]
        lines.append(f"- Contamination: {c['images']} evaluation images of {c['datasets']} datasets checked against "
                     f"the curated store (exact content hash; near: pHash + thumbnail, curation's rule): "
                     f"{t['exact']['train']} exact and {t['near']['train']} near copies in its train split "
                     f"({t['exact']['probe'] + t['exact']['test']} exact in probe/test).")
        for name, f in sorted(c.get("contaminated_datasets", {}).items()):
            lines.append(f"  - {name}: {f['exact_train_fraction']:.2%} exact, {f['near_train_fraction']:.2%} near "
                         "in train: its scores are not held-out scores")
        lines += [f"  - e.g. {e}" for e in c.get("examples", [])]
    flagged = checks.get("split_not_by_patient") or {}
    if flagged:
        lines.append("- Splits not by patient (one patient's images may be in train and test): "
                     + ", ".join(f"{n} ({how})" for n, how in sorted(flagged.items())) + ".")
    return lines
