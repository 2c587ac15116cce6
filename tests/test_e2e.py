"""End-to-end: the smoke `retrain` flow through Prefect, with its own MLflow database; asserts real outputs."""

import json

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mmkd.steps import PIPELINE
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
TEACHERS = ("rad-clip", "path-clip", "vis-clip", "bio-clip")


# the smoke profile evaluates five of the suite's 14 sets: every task type, and a specialist's own domain
SUITE = {"embedded-xray", "embedded-pathology", "embedded-vqa", "embedded-survival-pathology", "embedded-mil-ct"}
HEADLINE = {"zeroshot_acc1", "zeroshot_balanced_acc", "zeroshot_auc_macro", "probe_acc1", "probe_p10_acc1",
            "probe_k1_acc1", "i2t_r1", "t2i_r1", "vqa_acc", "cindex_harrell", "cindex_uno", "mil_auc"}


def test_metrics_cover_every_model_dataset_and_task_type(smoke_run):
    root = smoke_run["root"]
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"student", "student_stage1", *TEACHERS, "gain"}  # gain: student - student_stage1
    assert set(metrics.pop("gain")) == {"embedded-xray", "embedded-pathology", "mean"}  # zero-shot and probe sets
    # the stage-1 student, the gain's baseline, is evaluated on the zero-shot and probe sets only
    assert set(metrics["student_stage1"]) == {"embedded-xray", "embedded-pathology", "mean"}
    for model, per in metrics.items():
        if model == "student_stage1":
            continue
        assert set(per) == {*SUITE, "mean"}, model
        assert HEADLINE <= set(per["mean"]), (model, HEADLINE - set(per["mean"]))
        for dataset, m in per.items():
            for key, value in m.items():
                if key.endswith(("_acc1", "_auc", "_acc", "_r1", "_r10")) and np.isfinite(value):
                    assert 0.0 <= value <= 1.0, (model, dataset, key)
    # the domain flag follows each teacher's declared modalities
    assert metrics["path-clip"]["embedded-pathology"]["in_domain"] == 1.0
    assert metrics["path-clip"]["embedded-xray"]["in_domain"] == 0.0
    assert all(m["in_domain"] == 1.0 for d, m in metrics["bio-clip"].items() if d != "mean")  # the generalist
    board = (root / "reports" / "leaderboard.md").read_text()
    assert all(name in board for name in metrics) and "win/tie/loss" in board
    for task in ("zeroshot", "probe", "retrieval", "vqa", "survival", "mil"):
        assert f"## {task}" in board
    status = json.loads((root / "reports" / "evaluation.json").read_text())
    assert status["failed"] == {} and status["missing"] == {} and len(status["evaluation_id"]) == 16
    assert (root / "reports" / "plots" / "student_vs_best_teacher.csv").exists()
    # each (model, dataset) unit was its own Prefect task run, and its embeddings were cached
    assert len(list((root / "artifacts" / "evaluation" / "embeddings").glob("*/*.npz"))) == 5 * len(SUITE) + 2


def test_every_step_left_its_files(smoke_run):
    root = smoke_run["root"]
    art = root / "artifacts"
    assert (art / "curated" / "manifest.jsonl").exists()
    assert (art / "curated" / "quarantine.jsonl").read_text() == ""
    assert json.loads((root / "reports" / "validation.json").read_text())["success"]
    assert (root / "reports" / "data_docs" / "index.html").exists()
    for t in TEACHERS:
        assert (art / "teachers" / t / "model.safetensors").exists()
    for store in ("teachers", "aligned"):  # one feature set per teacher in each store, every pair covered
        held = json.loads((art / "features" / "teachers" / "features.json").read_text())["teachers"]
        assert set(held) == set(TEACHERS) and all(v["coverage"]["train"] == 1.0 for v in held.values())
        assert (art / "features" / store / "index.sqlite").exists()
        assert sorted(p.parent.parent.name for p in (art / "features" / store / "shards").glob("*/*/*.keys.npy")) \
            == sorted(TEACHERS)
    assert (art / "features" / "aligned" / "projector" / "projector.safetensors").exists()
    assert (art / "student_stage1" / "model.safetensors").exists()
    assert (art / "student" / "model.safetensors").exists()


def test_distillation_changed_the_student(smoke_run):
    from safetensors.torch import load_file

    art = smoke_run["root"] / "artifacts"
    a, b = load_file(art / "student_stage1" / "model.safetensors"), load_file(art / "student" / "model.safetensors")
    assert any(not np.allclose(a[k].numpy(), b[k].numpy()) for k in a)


def test_mlflow_holds_the_run_tree(smoke_run):
    reg = smoke_run["result"]["registration"]
    client = MlflowClient(tracking_uri=reg["tracking_uri"], registry_uri=reg["tracking_uri"])
    assert reg["tracking_uri"] == smoke_run["tracking_uri"]  # the session's team server (tests/conftest.py)
    exp = client.get_experiment_by_name("mmkd")
    parent = client.get_run(smoke_run["result"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mmkd.profile"] == "smoke"
    assert parent.data.tags["mmkd.data_hash"] not in ("", "none")
    assert "mlflow.source.git.commit" in parent.data.tags
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    steps = {r.data.tags["mmkd.step"]: r for r in children}
    assert set(PIPELINE) <= set(steps)
    assert steps["pretrain"].data.metrics["train.loss"] > 0
    assert "distill.fd_weight" in steps["distill"].data.params
    assert steps["evaluate"].data.metrics["student.mean.zeroshot_acc1"] >= 0
    assert all(r.info.status == "FINISHED" for r in children)


def test_champion_model_loads_and_embeds(smoke_run, tmp_path):
    import mlflow
    import pandas as pd

    from mmkd.tracking.pyfunc import encode_image_b64

    reg = smoke_run["result"]["registration"]
    mlflow.set_tracking_uri(reg["tracking_uri"])
    mlflow.set_registry_uri(reg["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/mmkd-student@champion", dst_path=str(tmp_path))  # not a leaked /tmp dir
    png = next((smoke_run["root"] / "data" / "images" / "xray" / "test").glob("*.png"))
    out = model.predict(pd.DataFrame({"image": [encode_image_b64(png), None],
                                      "text": ["Chest radiograph showing a left pleural effusion.", "a CT scan"]}))
    img, txt = np.array(out["image_embedding"][0]), np.array(out["text_embedding"][0])
    assert img.shape == txt.shape == (128,)
    assert abs(np.linalg.norm(img) - 1) < 1e-4 and abs(np.linalg.norm(txt) - 1) < 1e-4
    assert out["image_embedding"][1] is None and len(out["text_embedding"][1]) == 128
    text_only = model.predict(pd.DataFrame({"text": ["Brain MRI with a left glioma."]}))
    assert len(text_only["text_embedding"][0]) == 128 and text_only["image_embedding"][0] is None
    client = MlflowClient(tracking_uri=reg["tracking_uri"], registry_uri=reg["tracking_uri"])
    assert str(client.get_model_version_by_alias("mmkd-student", "champion").version) == reg["version"]


def test_dvc_stages_mirror_the_pipeline():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(PIPELINE)
    for name, stage in stages.items():
        assert stage["cmd"] == f"mmkd stage {name}"
