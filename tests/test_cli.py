"""Code tests: the `mmkd` command line's errors and the deployment file."""

from typer.testing import CliRunner

from mmkd.cli import app
from tests.conftest import REPO

runner = CliRunner()


def test_unknown_stage_is_rejected(workspace):
    res = runner.invoke(app, ["stage", "bogus", "--root", str(workspace)])
    assert res.exit_code == 2 and "unknown stage 'bogus'" in res.output


def test_bad_params_name_the_key(workspace):
    p = workspace / "params.yaml"
    p.write_text(p.read_text().replace("seed: 1234", "seed: many"))
    res = runner.invoke(app, ["stage", "curate", "--root", str(workspace)])
    assert res.exit_code == 2 and "seed" in res.output


def test_curate_without_data_names_the_missing_manifest(workspace):
    res = runner.invoke(app, ["stage", "curate", "--root", str(workspace)])
    assert res.exit_code != 0
    assert "manifest.jsonl" in str(res.exception)


def test_prefect_yaml_matches_params():
    res = runner.invoke(app, ["deploy", "--check", "--root", str(REPO)])
    assert res.exit_code == 0, res.output
    text = (REPO / "prefect.yaml").read_text()
    assert "flows/retrain.py:retrain" in text and "0 3 * * 1" in text


def test_dvc_entry_point_runs_steps_as_top_level_mlflow_runs(workspace):
    """`mmkd data synth` then `mmkd stage curate|validate`: what DVC stages call, outside any flow."""
    import json

    from mlflow import MlflowClient

    for args in (["data", "synth"], ["stage", "curate"], ["stage", "validate"], ["data", "report"]):
        res = runner.invoke(app, [*args, "--root", str(workspace), "--profile", "smoke"])
        assert res.exit_code == 0, (args, res.output, res.exception)
    assert json.loads((workspace / "reports" / "validation.json").read_text())["success"]
    assert (workspace / "artifacts" / "curated" / "shards" / "train-00000.tar").exists()
    assert "per modality" in res.output and "quarantine reasons" in res.output  # the report
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow_server' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mmkd").experiment_id])
    assert {r.data.tags["mmkd.step"] for r in runs} == {"synth", "curate", "validate"}
    assert all("mlflow.parentRunId" not in r.data.tags for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
