"""Owns the evaluation's reports: metrics.json (with the distillation gain), the leaderboard with paired
win/tie/loss, the evaluation id, and the plots (DVC and MLflow)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from mmkd.evaluation.paired import PairedTests, add_paired, gain
from mmkd.evaluation.stats import mean_over_sets
from mmkd import atomic

BOOTSTRAP_SEED = 42  # the tasks' (mmkd.evaluation.tasks.BOOTSTRAP_SEED): the report redraws the plans they used

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
PER_SET_ONLY = ("n_test", "in_domain", "probe_c", "cindex_alpha", "cindex_folds", "mil_n_bags", "vqa_n_answers",
                "vqa_n_test", "retrieval_n_unique_captions")


def _metric(per: dict, dataset: str, alts: tuple[str, ...]) -> str | None:
    m = per.get(dataset, {})
    return next((a for a in alts if a in m), None)


def comparisons(plan: dict, results: dict) -> list[dict]:
    """One row per (dataset, task, headline metric) that at least one model of the plan reports: each model's
    value and CI (entries of `results` that are no model of the plan, such as metrics.json's `gain`, are not)."""
    planned = {m["name"] for m in plan["models"]}
    results = {m: per for m, per in results.items() if m in planned}
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
                        values[model] = (m[metric], m.get(f"{metric}_ci_low", np.nan),
                                         m.get(f"{metric}_ci_high", np.nan))
                rows.append({"dataset": d["name"], "task": task, "metric": metric, "modality": d["modality"],
                             "values": values})
    return rows


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
    """{group: {win, tie, loss}} from each row's paired test of student minus teacher (row["paired"], see
    paired.add_paired); key(row) groups the comparisons (None: one group, 'all'). Rows without a paired test
    (no per-item outcomes) are not counted."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        res = r.get("paired", {}).get(teacher)
        if res is not None:
            g = key(r) if key else "all"
            cell = out.setdefault(g, {"win": 0, "tie": 0, "loss": 0})
            cell[res["verdict"]] += 1
    return out


def metrics_json(results: dict, gain_: dict | None = None) -> dict:
    """model -> dataset -> metric, plus each model's `mean` over datasets (union of metric names, with counts);
    `gain` (when student_stage1 was evaluated): dataset -> metric -> student minus student_stage1, with its
    paired CI, and its `mean` over sets."""
    out = {m: {**per, "mean": mean_over_sets(per, skip=PER_SET_ONLY)} for m, per in results.items()}
    if gain_:
        out["gain"] = gain_
    return out


def evaluation_id(plan: dict, results: dict, fingerprints: dict[str, str | None] | None = None) -> str:
    """What the scores were measured on: every dataset with its tasks, test size and content fingerprint (the
    bytes of its images and items, run.dataset_fingerprint), and the task settings. Scores of two evaluations are
    comparable only when their ids are equal (the promotion gate checks): a suite whose contents changed gets a
    new id even with the same names and sizes; regenerating the same suite keeps it."""
    sizes: dict[str, float] = {}
    for per in results.values():
        for d, m in per.items():
            if isinstance(m, dict):
                sizes.setdefault(d, m.get("n_test"))
    fp = fingerprints or {}
    key = {"datasets": [[d["name"], d["tasks"], sizes.get(d["name"]), fp.get(d["name"])] for d in plan["datasets"]],
           "settings": plan.get("settings")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_results(results_dir: Path, plan: dict) -> tuple[dict, dict]:
    """(model -> dataset -> metrics, failures 'model/dataset' -> reason) from the per-pair result files."""
    units = load_units(results_dir, plan)
    return units["results"], units["failed"]


def planned_units(plan: dict) -> list[tuple[str, str]]:
    """The (model, dataset) units of a plan, dataset by dataset. The stage-1 student is the baseline of the
    distillation gain, measured on zero-shot and probe: it is evaluated on the datasets with those tasks only (its
    VQA, survival and MIL units cost ~8 s of the default run and enter no comparison the report makes)."""
    from mmkd.evaluation.paired import GAIN_TASKS

    return [(m["name"], d["name"]) for d in plan["datasets"] for m in plan["models"]
            if m["name"] != "student_stage1" or set(d["tasks"]) & set(GAIN_TASKS)]


def load_units(results_dir: Path, plan: dict) -> dict:
    """Every unit's files: results (model -> dataset -> metrics), failed ('model/dataset' -> reason), outcomes
    (model -> dataset -> metric -> Outcome) and fingerprints (dataset -> content fingerprint). A dataset whose
    units disagree on its fingerprint (its files changed during the evaluation) is an error."""
    from mmkd.evaluation.run import outcomes_path, read_outcomes

    results: dict[str, dict] = {}
    outcomes: dict[str, dict] = {}
    failed: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    domains = {m["name"]: m.get("domain") for m in plan["models"]}
    models = {m["name"]: m for m in plan["models"]}
    datasets = {d["name"]: d for d in plan["datasets"]}
    for m, d in ((models[a], datasets[b]) for a, b in planned_units(plan)):
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
        items = outcomes_path(results_dir, m["name"], d["name"])
        if items.exists():
            outcomes.setdefault(m["name"], {})[d["name"]] = read_outcomes(items)
        fp = res.get("dataset_fingerprint")
        if fp is not None and fingerprints.setdefault(d["name"], fp) != fp:
            raise ValueError(f"{d['name']}: its units saw different contents ({fingerprints[d['name']]} vs {fp} "
                             f"for {m['name']}): the dataset changed during the evaluation; evaluate again")
    return {"results": results, "failed": failed, "outcomes": outcomes, "fingerprints": fingerprints}


def write_reports(plan: dict, results_dir: Path, metrics_path: Path, leaderboard_path: Path, plots_dir: Path,
                  status_path: Path, rejected_dir: Path | None = None, data_checks: dict | None = None) -> dict:
    """rejected_dir: <dataset>.jsonl of the records each loader refused, with reasons (counted in the status).
    data_checks: {"contamination": ..., "split_not_by_patient": ...} (steps.evaluate.data_checks), reported as is."""
    from mmkd.evaluation.leaderboard import leaderboard  # both import this module's tables
    from mmkd.evaluation.plots import write_plots

    units = load_units(results_dir, plan)
    results, failed = units["results"], units["failed"]
    rejected = {p.stem: sum(1 for _ in open(p)) for p in sorted(Path(rejected_dir).glob("*.jsonl"))} \
        if rejected_dir else {}
    tests = PairedTests(units["outcomes"], BOOTSTRAP_SEED)
    rows = comparisons(plan, results)
    others = [m["name"] for m in plan["models"] if m["name"] != "student"]
    add_paired(rows, tests, "student", others)
    gain_ = gain(rows, tests)
    designs: dict[str, set[str]] = {}
    for r in rows:
        for per in units["outcomes"].values():
            o = per.get(r["dataset"], {}).get(r["metric"])
            if o is not None:
                designs.setdefault(r["task"], set()).add(o.design)
    status = {"evaluation_id": evaluation_id(plan, results, units["fingerprints"]),
              "fingerprints": units["fingerprints"], "missing": plan["missing"], "failed": failed,
              "rejected_records": rejected,
              "unpaired": sorted({f"{r['dataset']}/{r['metric']}" for r in rows if student_untested(r)}),
              "paired": [{"dataset": r["dataset"], "metric": r["metric"], "vs": o, **res}
                         for r in rows for o, res in r["paired"].items()],
              "data_checks": data_checks or {}}
    metrics = metrics_json(results, gain_)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(metrics_path, metrics, sort_keys=True)
    atomic.write_text(leaderboard_path, leaderboard(plan, results, status, rows, designs, gain_))
    plots = write_plots(plan, results, plots_dir)
    atomic.write_json(status_path, {**status, "plan": plan}, sort_keys=True)
    return {"metrics": metrics, "status": status, "plots": plots}


def student_untested(row: dict) -> bool:
    """The student and another model both have a value on this row, but no paired test (no per-item outcomes)."""
    return "student" in row["values"] and len(row["values"]) > 1 and not row.get("paired")
