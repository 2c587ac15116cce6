"""Owns what the dashboard shows, read from MLflow: each registered version's gate decision, data version and runs,
the champion's evaluation against the teachers, and the tables built from them (pandas, no UI code).

A registered version points at the `register` step's run; its pipeline run (`mlflow.parentRunId`) carries the
data version (`mmkd.data_hash`), and the `evaluate` run beside it holds the scores: its `metrics.json` artifact
(== reports/metrics.json) and `evaluation.json` (the evaluation plan: models, datasets, modalities, tasks).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmkd.evaluation.report import HEADLINES, comparisons
from mmkd.tracking import gate

STUDENT = "student"  # the evaluated student of a pipeline run (its model version is registered by `register`)


class DashboardEmpty(RuntimeError):
    """Nothing to show yet (no registered model, no champion, no evaluation); the message says what is missing."""


@dataclass
class Evaluation:
    """The scores of one evaluate run: metrics (model -> dataset -> metric) and its plan (models and datasets)."""

    run_id: str
    experiment_id: str
    metrics: dict
    plan: dict
    evaluation_id: str | None = None
    notes: list[str] = field(default_factory=list)  # what had to be reconstructed, and why

    @property
    def teachers(self) -> list[str]:
        return [m["name"] for m in self.plan["models"] if m["kind"] == "teacher" and m["name"] in self.metrics]


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --- links into the MLflow UI -------------------------------------------------------------------------------

def ui_base(tracking_uri: str, ui_url: str | None = None) -> str | None:
    """The MLflow UI's base URL: `ui_url` when given, else the tracking server's own URL (None for a file store)."""
    if ui_url:
        return ui_url.rstrip("/")
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None


def run_url(base: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base and experiment_id and run_id else None


def version_url(base: str | None, model_name: str, version: str) -> str | None:
    return f"{base}/#/models/{model_name}/versions/{version}" if base else None


def model_url(base: str | None, model_name: str) -> str | None:
    return f"{base}/#/models/{model_name}" if base else None


# --- the registry ---------------------------------------------------------------------------------------------

def _missing(e: MlflowException) -> bool:
    return e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e.message).lower()


def versions(client: MlflowClient, model_name: str) -> list:
    """Every version of `model_name`, oldest first, with its aliases; DashboardEmpty if the model is not registered."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as e:
        if _missing(e):
            raise DashboardEmpty(f"no registered model '{model_name}' in the registry yet: a pipeline run "
                                 "(`make run` or `mmkd run`) registers one") from e
        raise
    found = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():  # a search leaves versions' aliases empty
        aliases.setdefault(str(version), []).append(alias)
    for v in found:
        v.aliases = sorted(set(v.aliases or []) | set(aliases.get(str(v.version), [])))
    return found


def champion(client: MlflowClient, model_name: str, alias: str = "champion"):
    """The version holding `alias`, or None."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if _missing(e):
            return None
        raise


def _run(client: MlflowClient, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if _missing(e):
            return None
        raise


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _ts(ms: int | None) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC") if ms else ""


def evaluate_run(client: MlflowClient, register_run):
    """The evaluate run whose scores a version was registered with: the one of the same pipeline run, else (a step
    run outside a pipeline) the latest evaluate run of the experiment started before the register run."""
    if register_run is None:
        return None
    parent = register_run.data.tags.get("mlflow.parentRunId")
    where = "tags.`mmkd.step` = 'evaluate' and attributes.status = 'FINISHED'"
    where += f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else \
        f" and attributes.start_time <= {register_run.info.start_time}"
    found = client.search_runs([register_run.info.experiment_id], where, order_by=["attributes.start_time DESC"],
                               max_results=1)
    return found[0] if found else None


def history(client: MlflowClient, model_name: str = "mmkd-student", champion_alias: str = "champion",
            ui_url: str | None = None) -> pd.DataFrame:
    """One row per registered version, oldest first: when, its data version, what triggered its pipeline run
    (mmkd.trigger: schedule, inbox, ...), the gate's decision, reason and scores, whether it became champion (and
    until which version), its aliases now, and its MLflow runs (ids, links)."""
    base = ui_base(client.tracking_uri, ui_url)
    rows = []
    for v in versions(client, model_name):
        tags = v.tags or {}
        reg = _run(client, v.run_id)
        pipe = _run(client, reg.data.tags.get("mlflow.parentRunId")) if reg else None
        ev = evaluate_run(client, reg)
        exp = reg.info.experiment_id if reg else None
        # the version's own tag (the register step sets it), else its pipeline run's data hash, else the step run's
        data_version = tags.get(gate.DATA_TAG) or (pipe.data.tags.get("mmkd.data_hash") if pipe else None) or \
            (reg.data.tags.get("mmkd.data_hash") if reg else None)
        score = tags.get(gate.SCORE_TAG)
        champ_score = reg.data.metrics.get("gate.champion_score") if reg else None
        rows.append({
            "version": str(v.version), "registered": _ts(v.creation_timestamp),
            "data_version": data_version or "", "profile": (reg.data.tags.get("mmkd.profile", "") if reg else ""),
            "trigger": pipe.data.tags.get("mmkd.trigger", "") if pipe else "",
            "decision": tags.get(gate.DECISION_TAG, ""), "reason": tags.get(gate.REASON_TAG, ""),
            "metric": tags.get(gate.METRIC_TAG, ""),
            "score": _float(score),
            "champion_score": float(champ_score) if champ_score is not None else math.nan,
            "champion_after": f"v{reg.data.tags['mmkd.champion_version']}"
            if reg and reg.data.tags.get("mmkd.champion_version") else "",
            "aliases": ", ".join(sorted(v.aliases or [])), "is_champion": champion_alias in (v.aliases or []),
            "pipeline_run_id": pipe.info.run_id if pipe else "", "register_run_id": v.run_id or "",
            "evaluate_run_id": ev.info.run_id if ev else "", "experiment_id": exp or "",
            "version_url": version_url(base, model_name, str(v.version)),
            "pipeline_run_url": run_url(base, exp, pipe.info.run_id if pipe else None),
            "evaluate_run_url": run_url(base, exp, ev.info.run_id if ev else None),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        raise DashboardEmpty(f"registered model '{model_name}' has no versions yet")
    # the champion's reign: from its promotion to the next promotion (a held version changes nothing)
    promoted = df.index[df["decision"] == "promoted"].tolist()
    df["champion_until"] = ""
    for i, j in zip(promoted, promoted[1:] + [None]):
        df.loc[i, "champion_until"] = f"v{df.loc[j, 'version']} ({df.loc[j, 'registered']})" if j is not None \
            else ("now" if df.loc[i, "is_champion"] else "")
    return df


# --- one evaluation -------------------------------------------------------------------------------------------

def _artifact_json(client: MlflowClient, run_id: str, name: str) -> dict | None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())
    except (MlflowException, OSError, ValueError):
        return None


def metrics_from_run(run_metrics: dict) -> dict:
    """model -> dataset -> metric from an evaluate run's flat `<model>.<dataset>.<metric>` metrics (dataset and
    metric names hold no dots; a model's name may)."""
    out: dict[str, dict] = {}
    for key, value in run_metrics.items():
        parts = key.rsplit(".", 2)
        if len(parts) == 3 and "/" not in key:
            model, dataset, metric = parts
            out.setdefault(model, {}).setdefault(dataset, {})[metric] = value
    return out


def plan_from_metrics(metrics: dict) -> dict:
    """An evaluation plan rebuilt from the metrics alone: a model named student* is a student, any other a teacher;
    each dataset's tasks are those whose headline metric it has; modality from the catalog (else 'unknown')."""
    from mmkd.config import MODALITIES
    from mmkd.evaluation.catalog import embedded_entries, load_catalog

    known = {e.name: list(e.modalities) for e in [*embedded_entries(MODALITIES, MODALITIES), *load_catalog()]}
    names = sorted({d for m, per in metrics.items() if m != "gain" for d in per if d != "mean"})
    datasets = []
    for d in names:
        have = set().union(*(per.get(d, {}).keys() for per in metrics.values()))
        tasks = [t for t, groups in HEADLINES.items() if any(a in have for alts in groups for a in alts)]
        mods = known.get(d, ["unknown"])
        datasets.append({"name": d, "modalities": mods, "modality": mods[0] if len(mods) == 1 else "mixed",
                         "tasks": tasks})
    # metrics.json's `gain` (student minus student_stage1 per set) is no model
    models = [{"name": m, "kind": "student" if m.startswith(STUDENT) else "teacher", "domain": None}
              for m in sorted(metrics) if m != "gain"]
    return {"models": models, "datasets": datasets}


def load_evaluation(client: MlflowClient, run) -> Evaluation:
    """The scores of an evaluate run: its metrics.json and evaluation.json artifacts, else rebuilt from its metrics."""
    notes = []
    metrics = _artifact_json(client, run.info.run_id, "metrics.json")
    if metrics is None:
        metrics = metrics_from_run(run.data.metrics)
        notes.append("metrics.json artifact unreadable: scores read from the run's metrics")
    status = _artifact_json(client, run.info.run_id, "evaluation.json") or {}
    plan = status.get("plan")
    if plan is None:
        plan = plan_from_metrics(metrics)
        notes.append("evaluation.json artifact unreadable: models and datasets inferred from the metrics")
    if not metrics:
        raise DashboardEmpty(f"evaluate run {run.info.run_id} holds no scores")
    return Evaluation(run.info.run_id, run.info.experiment_id, metrics, plan, status.get("evaluation_id"), notes)


def champion_evaluation(client: MlflowClient, model_name: str = "mmkd-student", alias: str = "champion",
                        version: str | None = None):
    """(the version holding `alias`, or `version` when given; its Evaluation). DashboardEmpty naming what is missing."""
    versions(client, model_name)  # DashboardEmpty when the model is not registered
    if version is None:
        mv = champion(client, model_name, alias)
        if mv is None:
            raise DashboardEmpty(f"'{model_name}' has no '{alias}' alias yet: no version has passed the promotion gate")
    else:
        try:
            mv = client.get_model_version(model_name, str(version))
        except MlflowException as e:
            if _missing(e):
                raise DashboardEmpty(f"'{model_name}' has no version {version}") from e
            raise
    ev = evaluate_run(client, _run(client, mv.run_id))
    if ev is None:
        raise DashboardEmpty(f"{model_name} v{mv.version}: no finished evaluate run found for its register run "
                             f"{mv.run_id}")
    return mv, load_evaluation(client, ev)


# --- tables ---------------------------------------------------------------------------------------------------

def scores(ev: Evaluation, student: str = STUDENT) -> pd.DataFrame:
    """Long table, one row per (dataset, task, headline metric, model) for the student and each teacher:
    modality, role (champion | teacher), value, ci_low, ci_high (NaN without a CI). Values are metrics.json's."""
    keep = [student, *ev.teachers]
    rows = []
    for r in comparisons(ev.plan, ev.metrics):
        for model in keep:
            if model in r["values"]:
                v, lo, hi = r["values"][model]
                rows.append({"dataset": r["dataset"], "modality": r["modality"], "task": r["task"],
                             "metric": r["metric"], "model": model,
                             "role": "champion" if model == student else "teacher",
                             "value": float(v), "ci_low": float(lo), "ci_high": float(hi)})
    return pd.DataFrame(rows, columns=["dataset", "modality", "task", "metric", "model", "role", "value",
                                       "ci_low", "ci_high"])


def deltas(ev: Evaluation, student: str = STUDENT) -> pd.DataFrame:
    """One row per (dataset, task, headline metric) with the student and teachers: student minus best teacher."""
    teachers = ev.teachers
    rows = []
    for r in comparisons(ev.plan, ev.metrics):
        tv = {t: r["values"][t][0] for t in teachers if t in r["values"]}
        if student not in r["values"] or not tv:
            continue
        best = max(tv, key=tv.get)
        s = r["values"][student][0]
        rows.append({"dataset": r["dataset"], "modality": r["modality"], "task": r["task"], "metric": r["metric"],
                     "student": s, "best_teacher": best, "best_teacher_value": tv[best], "delta": s - tv[best]})
    return pd.DataFrame(rows, columns=["dataset", "modality", "task", "metric", "student", "best_teacher",
                                       "best_teacher_value", "delta"])


def heatmap(ev: Evaluation, student: str = STUDENT) -> pd.DataFrame:
    """Task x modality: the mean, over that cell's (dataset, headline metric) rows, of student minus best teacher
    (NaN where no dataset of that modality has that task). Tasks in HEADLINES order, modalities sorted."""
    d = deltas(ev, student)
    if d.empty:
        return pd.DataFrame()
    grid = d.pivot_table(index="task", columns="modality", values="delta", aggfunc="mean")
    return grid.reindex(index=[t for t in HEADLINES if t in grid.index], columns=sorted(grid.columns))


def task_means(ev: Evaluation, student: str = STUDENT) -> pd.DataFrame:
    """Task x model (student first, then the teachers): each model's mean headline metric per task."""
    s = scores(ev, student)
    if s.empty:
        return pd.DataFrame()
    grid = s.pivot_table(index="task", columns="model", values="value", aggfunc="mean")
    order = [m for m in [student, *ev.teachers] if m in grid.columns]
    return grid.reindex(index=[t for t in HEADLINES if t in grid.index], columns=order)


def fmt_value(v: float, lo: float = math.nan, hi: float = math.nan, digits: int = 3) -> str:
    """`0.383 [0.300, 0.467]` (the leaderboard's format), `0.383` without a CI, `-` for NaN."""
    if v is None or not math.isfinite(v):
        return "-"
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{v:.{digits}f}"


def comparison_table(ev: Evaluation, student: str = STUDENT, digits: int = 3, label: str = "champion") -> pd.DataFrame:
    """Wide display table, one row per (dataset, task, headline metric): dataset, modality, task, metric, the
    student's value with CI (column `label`), each teacher's, the best teacher and `label - best teacher`;
    strings as shown."""
    s = scores(ev, student)
    if s.empty:
        return pd.DataFrame()
    d = deltas(ev, student).set_index(["dataset", "task", "metric"])
    models = [student, *ev.teachers]
    rows = []
    for (dataset, task, metric), g in s.groupby(["dataset", "task", "metric"], sort=False):
        row = {"dataset": dataset, "modality": g["modality"].iloc[0], "task": task, "metric": metric}
        by = g.set_index("model")
        for m in models:
            row[label if m == student else m] = fmt_value(*by.loc[m, ["value", "ci_low", "ci_high"]],
                                                               digits=digits) if m in by.index else "-"
        key = (dataset, task, metric)
        row["best teacher"] = d.loc[key, "best_teacher"] if key in d.index else "-"
        row[f"{label} - best teacher"] = f"{d.loc[key, 'delta']:+.{digits}f}" if key in d.index else "-"
        rows.append(row)
    return pd.DataFrame(rows)
