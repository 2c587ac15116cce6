"""Model tests: the evaluate step through Prefect: a unit per (model, dataset), failures and missing sets reported."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def _workspace(smoke_root, tmp_path, datasets: list[str]):
    """The smoke run's models and suite in a fresh workspace, evaluating `datasets`."""
    for part in ("artifacts/student", "artifacts/student_stage1", "artifacts/teachers", "data/eval"):
        shutil.copytree(smoke_root / part, tmp_path / part)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["profile"] = "smoke"
    params["profiles"]["smoke"]["evaluate"]["datasets"] = datasets
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_a_broken_dataset_fails_its_units_and_a_missing_one_is_reported_the_others_complete(smoke_run, tmp_path):
    from prefect.client.orchestration import get_client

    from tasks.evaluate import evaluate

    root = _workspace(smoke_run["root"], tmp_path, ["embedded-pathology", "embedded-mil-ct", "pcam"])
    broken = sorted((root / "data/eval/embedded/mil-ct/patches").glob("*/*.png"))[0]
    broken.write_bytes(b"not a png")
    with open(root / "data/eval/embedded/pathology/manifest.csv", "a") as f:  # a record of an unknown class
        f.write("images/pathology-test-00000.png,tumour,test,H&E histology: a tumour.\n")
    result = evaluate(str(root), str(root / "params.yaml"), "smoke", None)

    summary = result["summary"]
    assert set(summary["missing"]) == {"pcam"} and "to get it" in summary["missing"]["pcam"]
    # (the stage-1 student, the gain's baseline, has no MIL unit: it is evaluated on zero-shot/probe sets only)
    assert set(summary["failed"]) == {f"{m}/embedded-mil-ct" for m in
                                      ("student", "rad-clip", "path-clip", "vis-clip", "bio-clip")}
    assert all(broken.name in why for why in summary["failed"].values())  # the error names the bad file
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert all(set(per) == {"embedded-pathology", "mean"} for per in metrics.values())
    board = (root / "reports/leaderboard.md").read_text()
    assert "## Not evaluated" in board and "pcam: missing" in board and "student/embedded-mil-ct: failed" in board
    # the refused record is kept with its reason, the rest of its dataset evaluated
    assert json.loads((root / "reports/evaluation.json").read_text())["rejected_records"] == {"embedded-pathology": 1}
    refused = json.loads((root / "artifacts/evaluation/rejected/embedded-pathology.jsonl").read_text())
    assert "tumour" in refused["reason"] and "manifest.csv" in refused["record"]
    assert "embedded-pathology: 1 records refused" in board
    with get_client(sync_client=True) as client:  # each unit was its own task run; the broken ones were retried
        runs = [r for r in client.read_task_runs() if r.name.startswith("evaluate ")]
    failed = [r for r in runs if r.state.is_failed()]
    assert sorted(r.name for r in failed) == sorted(f"evaluate {u.replace('/', ' on ')}" for u in summary["failed"])
    assert all(r.run_count == 2 for r in failed)
    assert len([r for r in runs if r.flow_run_id == failed[0].flow_run_id]) == 11  # 6 models x 2 sets, no stage-1 MIL

def test_cli_evaluate_runs_named_datasets_and_reports_missing_ones(smoke_run, tmp_path):
    from typer.testing import CliRunner

    from mmkd.cli import app

    root = _workspace(smoke_run["root"], tmp_path, ["embedded-xray"])
    res = CliRunner().invoke(app, ["evaluate", "--root", str(root), "--datasets", "embedded-vqa,kvasir-v2",
                                   "--models", "student,teachers", "--reports", str(tmp_path / "adhoc")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "missing: kvasir-v2" in res.output and "vqa_acc" in res.output
    metrics = json.loads((tmp_path / "adhoc" / "metrics.json").read_text())
    assert set(metrics) == {"student", "rad-clip", "path-clip", "vis-clip", "bio-clip"}
    assert set(metrics["student"]) == {"embedded-vqa", "mean"}
    assert not (root / "reports" / "metrics.json").exists()  # --reports left the pipeline's metrics alone
    res = CliRunner().invoke(app, ["evaluate", "--root", str(root), "--datasets", "no-such-set"])
    assert res.exit_code == 2 and "unknown dataset 'no-such-set'" in res.output


def test_units_running_at_once_share_one_load_of_each_model_and_dataset(monkeypatch):
    """evaluate.workers units run in threads: a model or dataset two of them ask for at once is loaded once, and
    only the last `keep` datasets stay referenced."""
    import threading
    import time

    from mmkd.steps import evaluate as step

    loads: list[str] = []

    def slow(kind):
        def load(ctx, name):
            loads.append(f"{kind}:{name}")
            time.sleep(0.2)  # long enough for the other thread to ask meanwhile
            return name
        return load

    monkeypatch.setattr(step, "load_model", slow("model"))
    monkeypatch.setattr(step, "_decode_dataset", slow("dataset"))
    session = step.Session(keep=2)
    got = []
    threads = [threading.Thread(target=lambda: got.append((session.model(None, "m"), session.dataset(None, "d1"))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [("m", "d1")] * 2 and sorted(loads) == ["dataset:d1", "model:m"]
    session.dataset(None, "d2")
    session.dataset(None, "d3")  # d1 is the oldest of three: dropped
    session.dataset(None, "d1")
    assert loads.count("dataset:d1") == 2 and loads.count("dataset:d3") == 1
