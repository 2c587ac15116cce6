"""The promotion gate on a real SQLite MLflow registry, the register step, the student pyfunc round trip, mmkd.load."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from PIL import Image

import mmkd
from mmkd.tracking.gate import (
    DECISION_TAG,
    METRIC_TAG,
    SCORE_TAG,
    GateError,
    gate,
    metric_value,
    read_score,
    PIPELINE_TAG,
    register_student,
)

METRIC = "student.mean.zeroshot_acc1"
MODEL = "gate-student"


def write_metrics(path: Path, score: float) -> Path:
    """A metrics.json shaped like evaluate's: model -> held-out set -> metric, plus `mean`."""
    path.write_text(json.dumps({"student": {"xray-finding": {"zeroshot_acc1": score, "i2t_r1": 0.1},
                                            "mean": {"zeroshot_acc1": score, "i2t_r1": 0.1}},
                                "rad-clip": {"mean": {"zeroshot_acc1": 0.9}}}))
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A fresh SQLite tracking + registry store, an experiment with local artifacts, one tiny student checkpoint."""
    from mmkd.models.factory import create_model, save_checkpoint

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("gate", artifact_location=(root / "artifacts").as_uri())
    torch.manual_seed(0)
    model = create_model("mmkd-student-tiny")
    ckpt = root / "student"
    save_checkpoint(model, ckpt, "mmkd-student-tiny")
    return {"root": root, "uri": uri, "client": client, "experiment": exp, "checkpoint": ckpt, "model": model}


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def register(reg: dict, score: float, model_name: str = MODEL, **gate_args):
    """What the register step does: a run, the student logged from it, gated on the metrics file's score."""
    client = reg["client"]
    run = client.create_run(reg["experiment"])
    metrics = write_metrics(reg["root"] / f"metrics-{run.info.run_id}.json", score)
    decision = register_student(reg["uri"], run.info.run_id, reg["checkpoint"], metrics, model_name, METRIC,
                                **gate_args)
    client.set_terminated(run.info.run_id)
    return decision, run.info.run_id


@pytest.fixture(scope="module")
def ladder(registry):
    """Three real registrations: v1 0.50 (first), v2 0.40 (worse), v3 0.55 (better)."""
    def env():
        return {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}

    steps = {"env-before": env()}
    for score in (0.50, 0.40, 0.55):
        decision, run_id = register(registry, score)
        steps[decision.version] = (decision, run_id)
        steps[decision.version + "-aliases"] = aliases(registry["client"], MODEL)
    steps["env-after"] = env()
    return steps


def test_first_version_becomes_champion(ladder):
    d, _ = ladder["1"]
    assert d.promoted and d.champion_version == "1" and d.previous_champion_version is None
    assert d.challenger_score == 0.50 and d.champion_score is None
    assert "no champion yet" in d.reason
    assert ladder["1-aliases"] == {"challenger": "1", "champion": "1"}
    # logging the model used MLflow's global URIs only meanwhile: later steps still log where they should
    assert ladder["env-after"] == ladder["env-before"]


def test_worse_challenger_does_not_become_champion(ladder, registry):
    d, _ = ladder["2"]
    assert not d.promoted
    assert (d.challenger_score, d.champion_score, d.previous_champion_version, d.champion_version) == (0.40, 0.50, "1", "1")
    assert "champion stays on v1" in d.reason
    assert ladder["2-aliases"] == {"challenger": "2", "champion": "1"}
    tags = registry["client"].get_model_version(MODEL, "2").tags
    assert tags[METRIC_TAG] == METRIC and float(tags[SCORE_TAG]) == 0.40 and tags[DECISION_TAG] == "held"


def test_better_challenger_becomes_champion_against_the_recorded_score(ladder, registry):
    d, _ = ladder["3"]
    # compared with v1 (the champion), not v2 (the last challenger)
    assert d.promoted and d.previous_champion_version == "1" and d.champion_score == 0.50
    assert ladder["3-aliases"] == {"challenger": "3", "champion": "3"}
    assert registry["client"].get_model_version(MODEL, "3").tags[DECISION_TAG] == "promoted"


def cheap_version(client: MlflowClient, name: str) -> str:
    """A model version without logging a model: for rules that do not need the artifact."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, source="file:///nowhere").version)


def test_equal_score_is_promoted_and_lower_is_better_reverses(registry):
    client = registry["client"]
    assert gate(client, "eq", cheap_version(client, "eq"), 0.5, METRIC).promoted
    tie = gate(client, "eq", cheap_version(client, "eq"), 0.5, METRIC)
    assert tie.promoted and tie.champion_version == "2" and ">=" in tie.reason

    lo = {"metric": "student.mean.i2t_mean_rank", "higher_is_better": False}
    gate(client, "lo", cheap_version(client, "lo"), 10.0, **lo)
    worse = gate(client, "lo", cheap_version(client, "lo"), 12.0, **lo)
    better = gate(client, "lo", cheap_version(client, "lo"), 9.0, **lo)
    assert not worse.promoted and better.promoted and better.previous_champion_version == "1"
    assert str(client.get_model_version_by_alias("lo", "champion").version) == "3"


def test_champion_without_a_comparable_score_is_replaced_and_the_reason_says_so(registry):
    client = registry["client"]
    old = cheap_version(client, "legacy")  # registered before the gate existed: no score tags
    client.set_registered_model_alias("legacy", "champion", old)
    d = gate(client, "legacy", cheap_version(client, "legacy"), 0.1, METRIC)
    assert d.promoted and d.champion_score is None and d.previous_champion_version == old
    assert d.reason == "champion v1 has no comparable score (no gate score recorded)"
    # a champion scored by another metric is not comparable either
    d = gate(client, "legacy", cheap_version(client, "legacy"), 0.05, "student.mean.probe_acc1")
    assert d.promoted and "scored by 'student.mean.zeroshot_acc1', not 'student.mean.probe_acc1'" in d.reason
    # custom aliases
    d = gate(client, "legacy", cheap_version(client, "legacy"), 0.0, "student.mean.probe_acc1",
             challenger_alias="candidate", champion_alias="prod")
    assert d.promoted and "no prod yet" in d.reason
    assert str(client.get_model_version_by_alias("legacy", "candidate").version) == d.version


def test_a_champion_scored_on_another_evaluation_is_not_compared(registry):
    """Scores from two different evaluation suites (other datasets, sizes or task settings) are not comparable."""
    client = registry["client"]
    first = gate(client, "evals", cheap_version(client, "evals"), 0.9, METRIC, evaluation="aaaa")
    assert first.promoted and first.evaluation == "aaaa"
    same = gate(client, "evals", cheap_version(client, "evals"), 0.5, METRIC, evaluation="aaaa")
    assert not same.promoted and same.champion_score == 0.9  # the same evaluation: compared, and worse
    other = gate(client, "evals", cheap_version(client, "evals"), 0.5, METRIC, evaluation="bbbb")
    assert other.promoted and other.champion_score is None
    assert "scored on another evaluation (aaaa, now bbbb)" in other.reason
    tags = client.get_model_version("evals", other.version).tags
    assert tags["mmkd.gate_evaluation"] == "bbbb"


def test_a_retried_registration_of_one_pipeline_run_reuses_its_version(registry):
    """A register step retried by Prefect (same parent run, a new step run) gates the version its first attempt
    created instead of creating a second one; another pipeline run gets a version of its own."""
    client, name = registry["client"], "mmkd-retried"
    first, _ = register(registry, 0.5, name, pipeline_run="parent-a")
    again, _ = register(registry, 0.5, name, pipeline_run="parent-a")
    assert again.version == first.version and again.promoted and again.champion_version == first.version
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [first.version]
    assert client.get_model_version(name, first.version).tags[PIPELINE_TAG] == "parent-a"
    other, _ = register(registry, 0.4, name, pipeline_run="parent-b")
    assert other.version != first.version and not other.promoted
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    assert aliases(client, name) == {"champion": first.version, "challenger": other.version}


def test_metric_paths(tmp_path):
    m = {"student": {"mean": {"zeroshot_acc1": 0.7, "bad": float("nan")}, "set.v2": {"acc": 1}}}
    assert metric_value(m, "student.mean.zeroshot_acc1") == 0.7
    assert metric_value(m, "student.set.v2.acc") == 1.0  # keys with dots
    with pytest.raises(GateError, match="no 'zeroshot_acc5' under student.mean"):
        metric_value(m, "student.mean.zeroshot_acc5")
    with pytest.raises(GateError, match="not a finite number"):
        metric_value(m, "student.mean.bad")
    with pytest.raises(GateError, match="not a finite number"):
        metric_value(m, "student.mean")
    with pytest.raises(GateError, match="run evaluate"):
        read_score(tmp_path / "missing.json", METRIC)


def test_bad_metric_fails_before_a_version_is_created(registry, tmp_path):
    client = registry["client"]
    run = client.create_run(registry["experiment"])
    with pytest.raises(GateError):
        register_student(registry["uri"], run.info.run_id, registry["checkpoint"],
                         write_metrics(tmp_path / "m.json", 0.5), "never", "student.mean.nope")
    assert client.search_registered_models("name = 'never'") == []


def _png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_pyfunc_round_trip_and_mmkd_load(ladder, registry):
    import mlflow
    import open_clip
    import pandas as pd
    from safetensors.torch import load_file

    from mmkd.models.factory import image_spec, to_tensor
    from mmkd.tracking.pyfunc import _mlflow_uris

    uri, model = registry["uri"], registry["model"].eval()
    spec = image_spec(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, spec.size, spec.size, 3), dtype=np.uint8)
    texts = ["Chest radiograph showing a left pleural effusion.", "Brain MRI with a left glioma."]
    with torch.no_grad():
        want_img = F.normalize(model.encode_image(to_tensor(images, spec, "cpu")).float(), dim=-1).numpy()
        tok = open_clip.get_tokenizer("mmkd-student-tiny")
        want_txt = F.normalize(model.encode_text(tok(texts)).float(), dim=-1).numpy()

    with _mlflow_uris(uri):
        pyf = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        out = pyf.predict(pd.DataFrame({"image": [_png_b64(i) for i in images], "text": texts}))
    np.testing.assert_allclose(np.array(out["image_embedding"].tolist()), want_img, atol=1e-5)
    np.testing.assert_allclose(np.array(out["text_embedding"].tolist()), want_txt, atol=1e-5)

    saved = load_file(registry["checkpoint"] / "model.safetensors")
    _, run_id = ladder["2"]
    for source in (f"models:/{MODEL}@champion", f"models:/{MODEL}/2", f"runs:/{run_id}/student",
                   str(registry["checkpoint"])):
        loaded = mmkd.load(source, tracking_uri=uri)
        assert isinstance(loaded, open_clip.CLIP) and not loaded.training, source
        state = loaded.state_dict()
        assert set(state) == set(saved), source
        assert all(torch.equal(state[k], saved[k]) for k in saved), source
    enc = mmkd.load_encoder(f"models:/{MODEL}/1", tracking_uri=uri)
    np.testing.assert_allclose(enc.encode_images(images), want_img, atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts(texts), want_txt, atol=1e-5)


def test_register_step_logs_the_decision_and_system_metrics(workspace, tmp_path, monkeypatch):
    """The step itself, twice: a first version (champion), then a worse one (held); MLflow run and registration.json."""
    from mmkd.models.factory import create_model, save_checkpoint
    from mmkd.steps import Context, run_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'step.db'}")
    ctx = Context.load(workspace)
    assert ctx.params.tracking.system_metrics
    save_checkpoint(create_model("mmkd-student-tiny"), ctx.ws.student, "mmkd-student-tiny")
    ctx.ws.metrics.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for score in (0.6, 0.3):
        write_metrics(ctx.ws.metrics, score)
        results.append(run_step("register", ctx))
    first, second = (r["summary"] for r in results)
    assert first["promoted"] and first["version"] == "1" and first["champion_score"] is None
    assert not second["promoted"] and second["reason"].endswith("champion stays on v1")
    assert (second["challenger_score"], second["champion_score"], second["champion_version"]) == (0.3, 0.6, "1")
    assert second["model_uri"] == "models:/mmkd-student/2"
    assert second["champion_uri"] == "models:/mmkd-student@champion"
    assert json.loads(ctx.ws.registration.read_text()) == json.loads(json.dumps(second))

    client = MlflowClient(tracking_uri=second["tracking_uri"], registry_uri=second["tracking_uri"])
    run = client.get_run(results[1]["run_id"])
    assert run.data.params["register.metric"] == METRIC and run.data.params["register.champion_alias"] == "champion"
    assert run.data.metrics["gate.challenger_score"] == 0.3 and run.data.metrics["gate.champion_score"] == 0.6
    assert run.data.metrics["gate.promoted"] == 0.0
    assert run.data.tags["mmkd.gate.decision"] == "held" and run.data.tags["mmkd.champion_version"] == "1"
    assert "gate.champion_score" not in client.get_run(results[0]["run_id"]).data.metrics
    # MLflow system metrics on the step's run, even though the step is shorter than the sampling interval
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    assert aliases(client, "mmkd-student") == {"challenger": "2", "champion": "1"}


def test_system_metrics_are_sampled_through_a_step_and_can_be_off(tmp_path):
    import time

    from mmkd.tracking.mlflow_runs import Tracker

    uri = f"sqlite:///{tmp_path / 'sys.db'}"
    tracker = Tracker(tmp_path, "sys", uri, system_metrics=0.2)
    with tracker.run("long-step", {}) as run:
        time.sleep(1.0)
    hist = tracker.client.get_metric_history(run.run_id, "system/system_memory_usage_megabytes")
    assert len(hist) >= 2 and [m.step for m in hist] == list(range(len(hist)))  # whole intervals + the last one
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"
    off = Tracker(tmp_path, "sys", uri, system_metrics=None)
    with off.run("quiet-step", {}) as run:
        pass
    assert not any(k.startswith("system/") for k in off.client.get_run(run.run_id).data.metrics)
