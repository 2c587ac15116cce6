"""The dashboard's data (mmkd.tracking.history): what the smoke run left in MLflow reads back as reports/metrics.json,
the history records each version's gate decision and data version, and an empty registry says so."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from mmkd.evaluation.report import HEADLINES
from mmkd.tracking import gate
from mmkd.tracking import history as h


def _expected_rows(metrics: dict, plan: dict) -> dict:
    """(dataset, task, metric) -> modality, from metrics.json and the plan: each task's first headline present."""
    rows = {}
    for d in plan["datasets"]:
        for task in d["tasks"]:
            for alts in HEADLINES[task]:
                metric = next((a for a in alts if any(a in per.get(d["name"], {}) for per in metrics.values())), None)
                if metric:
                    rows[(d["name"], task, metric)] = d["modality"]
    return rows


def _reports(smoke_run) -> tuple[dict, dict]:
    reports = smoke_run["root"] / "reports"
    return json.loads((reports / "metrics.json").read_text()), json.loads((reports / "evaluation.json").read_text())


def test_the_smoke_runs_version_reads_back_as_metrics_json(smoke_run, tracking_server):
    metrics, status = _reports(smoke_run)
    plan, reg = status["plan"], smoke_run["result"]["registration"]
    client = h.client_for(tracking_server["uri"])
    mv, ev = h.champion_evaluation(client, "mmkd-student", "champion", version=reg["version"])
    assert str(mv.version) == str(reg["version"])
    assert ev.metrics == metrics and ev.plan == plan and ev.notes == []
    assert ev.evaluation_id == status["evaluation_id"]
    teachers = [m["name"] for m in plan["models"] if m["kind"] == "teacher"]
    assert ev.teachers == teachers

    scores = h.scores(ev)
    expected = _expected_rows(metrics, plan)
    assert set(zip(scores["dataset"], scores["task"], scores["metric"])) == set(expected)
    assert set(scores["model"]) == {"student", *teachers}
    for r in scores.itertuples():
        m = metrics[r.model][r.dataset]
        assert r.value == m[r.metric] and r.modality == expected[(r.dataset, r.task, r.metric)]
        assert (r.ci_low, r.ci_high) == (m[f"{r.metric}_ci_low"], m[f"{r.metric}_ci_high"]) \
            if f"{r.metric}_ci_low" in m else (math.isnan(r.ci_low) and math.isnan(r.ci_high))

    # student minus the best teacher, averaged per (task, modality), computed here from metrics.json alone
    cells: dict[tuple[str, str], list[float]] = {}
    for (dataset, task, metric), modality in expected.items():
        best = max(metrics[t][dataset][metric] for t in teachers)
        cells.setdefault((task, modality), []).append(metrics["student"][dataset][metric] - best)
    grid = h.heatmap(ev)
    shown = {(t, mod): grid.loc[t, mod] for t in grid.index for mod in grid.columns if not math.isnan(grid.loc[t, mod])}
    assert shown == {k: pytest.approx(sum(v) / len(v), abs=1e-12) for k, v in cells.items()}

    means = h.task_means(ev)
    assert means.loc["zeroshot", "student"] == pytest.approx(metrics["student"]["mean"]["zeroshot_acc1"], abs=1e-12)
    table = h.comparison_table(ev).set_index(["dataset", "metric"])
    d, metric = next((k[0], k[2]) for k in expected if k[1] == "zeroshot")
    m = metrics["student"][d]
    assert table.loc[(d, metric), "champion"] == \
        f"{m[metric]:.3f} [{m[metric + '_ci_low']:.3f}, {m[metric + '_ci_high']:.3f}]"


def test_the_history_records_the_smoke_runs_version(smoke_run, tracking_server):
    reg, uri = smoke_run["result"]["registration"], tracking_server["uri"]
    client = h.client_for(uri)
    df = h.history(client, "mmkd-student", "champion")
    row = df.set_index("version").loc[str(reg["version"])]
    assert row["decision"] == ("promoted" if reg["promoted"] else "held") and row["reason"] == reg["reason"]
    assert row["score"] == reg["challenger_score"] and row["metric"] == reg["metric"]
    pipeline = client.get_run(smoke_run["result"]["parent_run_id"])
    assert row["pipeline_run_id"] == pipeline.info.run_id and row["register_run_id"] == reg["run_id"]
    assert row["data_version"] == reg.get("data_version", pipeline.data.tags["mmkd.data_hash"])
    assert client.get_run(row["evaluate_run_id"]).data.tags["mmkd.step"] == "evaluate"
    assert row["version_url"] == f"{uri}/#/models/mmkd-student/versions/{reg['version']}"
    assert row["pipeline_run_url"] == f"{uri}/#/experiments/{pipeline.info.experiment_id}/runs/{pipeline.info.run_id}"
    assert row["registered"].endswith("UTC")
    champ = h.champion(client, "mmkd-student", "champion")
    assert df.set_index("version").loc[str(champ.version), "is_champion"]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    """A SQLite MLflow store of its own (registrations the session's server must not see)."""
    return f"sqlite:///{tmp_path_factory.mktemp('dashboard-store') / 'mlflow.db'}"


_SCORES: dict[tuple[str, str], float] = {}  # (model, version) -> its val score, for the gate's comparisons


def _retrain(client: MlflowClient, exp: str, data_hash: str, score: float, model: str) -> str:
    """What a pipeline run leaves: a parent run, an evaluate run (flat metrics only) and a register run whose
    version the gate decides on."""
    parent = client.create_run(exp, run_name="retrain-smoke", tags={"mmkd.step": "pipeline", "mmkd.data_hash":
                                                                    data_hash, "mmkd.trigger": "inbox"})
    pid = parent.info.run_id
    ev = client.create_run(exp, tags={"mmkd.step": "evaluate", "mlflow.parentRunId": pid})
    for k, v in {"student.embedded-xray.zeroshot_acc1": score, "student.embedded-xray.zeroshot_acc1_ci_low": 0.1,
                 "student.embedded-xray.zeroshot_acc1_ci_high": 0.9, "rad-clip.embedded-xray.zeroshot_acc1": 0.4,
                 "evaluation_seconds": 3.0}.items():
        client.log_metric(ev.info.run_id, k, v)
    client.set_terminated(ev.info.run_id)
    reg = client.create_run(exp, tags={"mmkd.step": "register", "mlflow.parentRunId": pid, "mmkd.profile": "smoke"})
    mv = client.create_model_version(model, f"{reg.info.artifact_uri}/student", run_id=reg.info.run_id)

    def compare(champion: str) -> dict:  # what the register step's paired val comparison returns
        b = _SCORES[(model, champion)]
        return {"diff": score - b, "low": score - b - 0.02, "high": score - b + 0.02, "a": score, "b": b,
                "n_items": 400}

    d = gate.gate(client, model, mv.version, score, "val.zeroshot_acc1", compare, margin=0.01)
    _SCORES[(model, str(mv.version))] = score
    if d.champion_score is not None:
        client.log_metric(reg.info.run_id, "gate.champion_score", d.champion_score)
    client.set_terminated(reg.info.run_id)
    return str(mv.version)


def test_history_across_retrainings_held_and_promoted(local_store):
    client = h.client_for(local_store)
    exp = client.create_experiment("mmkd")
    client.create_registered_model("student-x")
    versions = [_retrain(client, exp, f"data{i}", s, "student-x") for i, s in enumerate([0.5, 0.4, 0.6])]
    df = h.history(client, "student-x", "champion", ui_url="http://ui.example:5000/").set_index("version")
    assert list(df.index) == versions == ["1", "2", "3"]
    assert list(df["decision"]) == ["promoted", "held", "promoted"]
    assert list(df["data_version"]) == ["data0", "data1", "data2"] and set(df["trigger"]) == {"inbox"}
    assert "champion stays on v1" in df.loc["2", "reason"] and df.loc["2", "champion_score"] == 0.5
    assert df.loc["1", "champion_until"].startswith("v3 (") and df.loc["2", "champion_until"] == ""
    assert df.loc["3", "champion_until"] == "now" and df.loc["3", "aliases"] == "challenger, champion"
    assert list(df["is_champion"]) == [False, False, True]
    assert df.loc["2", "version_url"] == "http://ui.example:5000/#/models/student-x/versions/2"

    # no metrics.json / evaluation.json artifacts: rebuilt from the run's metrics, and said so
    mv, ev = h.champion_evaluation(client, "student-x", "champion")
    assert str(mv.version) == "3" and len(ev.notes) == 2
    assert ev.metrics == {"student": {"embedded-xray": {"zeroshot_acc1": 0.6, "zeroshot_acc1_ci_low": 0.1,
                                                        "zeroshot_acc1_ci_high": 0.9}},
                          "rad-clip": {"embedded-xray": {"zeroshot_acc1": 0.4}}}
    assert h.comparison_table(ev).iloc[0].to_dict() == {
        "dataset": "embedded-xray", "modality": "xray", "task": "zeroshot", "metric": "zeroshot_acc1",
        "champion": "0.600 [0.100, 0.900]", "rad-clip": "0.400", "best teacher": "rad-clip",
        "champion - best teacher": "+0.200"}
    assert h.heatmap(ev).loc["zeroshot", "xray"] == pytest.approx(0.2)


def test_an_empty_registry_is_a_message_not_a_traceback(local_store):
    client = h.client_for(local_store)
    with pytest.raises(h.DashboardEmpty, match="no registered model 'nobody'.*make run"):
        h.history(client, "nobody")
    with pytest.raises(h.DashboardEmpty, match="no registered model 'nobody'"):
        h.champion_evaluation(client, "nobody")
    client.create_registered_model("unpromoted")
    with pytest.raises(h.DashboardEmpty, match="'unpromoted' has no versions"):
        h.history(client, "unpromoted")
    with pytest.raises(h.DashboardEmpty, match="no 'champion' alias yet"):
        h.champion_evaluation(client, "unpromoted")


def test_a_plan_rebuilt_from_metrics_json_leaves_the_gain_out_of_the_models():
    """Without evaluation.json the plan comes from metrics.json, whose `gain` entry is no model."""
    metrics = {"student": {"embedded-xray": {"zeroshot_acc1": 0.6}, "mean": {}},
               "rad-clip": {"embedded-xray": {"zeroshot_acc1": 0.5}, "mean": {}},
               "gain": {"embedded-xray": {"zeroshot_acc1": 0.1}, "mean": {"zeroshot_acc1": 0.1}}}
    plan = h.plan_from_metrics(metrics)
    assert [m["name"] for m in plan["models"]] == ["rad-clip", "student"]
    assert [d["name"] for d in plan["datasets"]] == ["embedded-xray"]
