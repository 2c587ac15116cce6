"""Owns the report's paired comparisons: a model against another on the same resamples of the same items, per
(dataset, headline metric), and the distillation gain (student minus student_stage1) with its mean over sets."""

from __future__ import annotations

import numpy as np

from mmkd.evaluation.stats import RESAMPLES, Outcome, paired_from_values, percentile_ci, resample_values, verdict

GAIN_TASKS = ("zeroshot", "probe")


class PairedTests:
    """Every model's per-item outcomes (model -> dataset -> metric -> Outcome) and, per (dataset, metric), one
    resample plan (seeded, from the outcomes' clusters and strata: the plan each model's own CI was drawn from)
    and each model's statistic on every resample, computed once and shared by all the comparisons."""

    def __init__(self, outcomes: dict[str, dict[str, dict[str, Outcome]]], seed: int, resamples: int = RESAMPLES):
        self.outcomes, self.seed, self.resamples = outcomes, seed, resamples
        self._plans: dict[tuple[str, str], list[np.ndarray]] = {}
        self._values: dict[tuple[str, str, str], np.ndarray] = {}

    def get(self, model: str, dataset: str, metric: str) -> Outcome | None:
        return self.outcomes.get(model, {}).get(dataset, {}).get(metric)

    def _resampled(self, model: str, dataset: str, metric: str) -> np.ndarray:
        key = (model, dataset, metric)
        if key not in self._values:
            o = self.get(model, dataset, metric)
            if (dataset, metric) not in self._plans:
                self._plans[(dataset, metric)] = o.plan(self.seed, self.resamples)
            self._values[key] = resample_values(o.value, self._plans[(dataset, metric)])
        return self._values[key]

    def compare(self, a: str, b: str, dataset: str, metric: str) -> dict | None:
        """{diff, low, high, a, b, resamples, verdict} of a minus b, or None when either lacks per-item outcomes.
        ValueError when the two describe different items (a paired test would be meaningless)."""
        oa, ob = self.get(a, dataset, metric), self.get(b, dataset, metric)
        if oa is None or ob is None:
            return None
        if not oa.same_items(ob):
            raise ValueError(f"{dataset}/{metric}: {a} and {b} were scored on different items or designs; "
                             "re-run the evaluation (a unit's outcomes are older than the others')")
        res = paired_from_values(oa.value(), ob.value(), self._resampled(a, dataset, metric),
                                 self._resampled(b, dataset, metric))
        return {**res, "verdict": verdict(res)}

    def mean_gain(self, a: str, b: str, cells: list[tuple[str, str]]) -> dict:
        """The mean over (dataset, metric) cells of a minus b, and its CI: the sets are independent, so resample r
        of every set together is one resample of the mean (each set drawn from its own plan)."""
        diffs = [self._resampled(a, d, m) - self._resampled(b, d, m) for d, m in cells]
        point = float(np.mean([self.get(a, d, m).value() - self.get(b, d, m).value() for d, m in cells]))
        low, high = percentile_ci(np.mean(diffs, axis=0))
        res = {"diff": point, "low": low, "high": high}
        return {**res, "verdict": verdict(res), "n_sets": len(cells)}


def add_paired(rows: list[dict], tests: PairedTests, student: str, others: list[str]) -> None:
    """row["paired"][other]: the student minus `other` on that row's dataset and metric (when both have outcomes)."""
    for r in rows:
        r["paired"] = {}
        if student not in r["values"]:
            continue
        for o in others:
            if o in r["values"]:
                res = tests.compare(student, o, r["dataset"], r["metric"])
                if res is not None:
                    r["paired"][o] = res


def gain(rows: list[dict], tests: PairedTests, student: str = "student", base: str = "student_stage1") -> dict:
    """metrics.json's `gain`: dataset -> {metric, metric_ci_low, metric_ci_high} of student minus `base` on the
    zero-shot and probe headline metrics, and `mean` -> the same averaged over sets per metric (+ `_n_sets`).
    Empty when either model was not evaluated."""
    out: dict[str, dict] = {}
    cells: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        if r["task"] not in GAIN_TASKS:
            continue
        res = tests.compare(student, base, r["dataset"], r["metric"])
        if res is None:
            continue
        m = r["metric"]
        out.setdefault(r["dataset"], {}).update({m: res["diff"], f"{m}_ci_low": res["low"],
                                                 f"{m}_ci_high": res["high"]})
        cells.setdefault(m, []).append((r["dataset"], m))
    if cells:
        mean: dict[str, float] = {}
        for m, c in cells.items():
            g = tests.mean_gain(student, base, c)
            mean.update({m: g["diff"], f"{m}_ci_low": g["low"], f"{m}_ci_high": g["high"], f"{m}_n_sets": len(c)})
        out["mean"] = mean
    return out
