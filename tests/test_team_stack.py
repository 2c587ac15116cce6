"""The team setup end to end: the smoke run in PostgreSQL and S3, DVC push/pull through S3, MLflow's basic-auth."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmkd.tracking.servers import S3Store, auth_config, database, free_port, stop, wait_http

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _keys(s3: S3Store, prefix: str) -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_smoke_run_lands_in_postgres_and_s3(smoke_run, tracking_server):
    uri, s3 = tracking_server["uri"], S3Store(**tracking_server["s3"])
    reg, parent_id = smoke_run["result"]["registration"], smoke_run["result"]["parent_run_id"]
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("mmkd")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # clients go through the server's proxy
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    steps = {r.data.tags["mmkd.step"]: r.info.run_id for r in children}
    assert {"evaluate", "register"} <= set(steps)

    # PostgreSQL holds the run tree and the registry
    with psycopg.connect(tracking_server["postgres_uri"]) as db:
        runs = dict(db.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s",
                               (int(exp.experiment_id),)).fetchall())
        versions = {v for (v,) in db.execute("SELECT version FROM model_versions WHERE name = %s",
                                             (reg["model_name"],))}
        aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                                  (reg["model_name"],)).fetchall())
    assert all(runs[i] == "FINISHED" for i in [parent_id, *steps.values()])
    assert int(reg["version"]) in versions
    assert aliases["challenger"] >= int(reg["version"]) and "champion" in aliases

    # S3 holds the artifacts: the evaluate run's metrics.json is the workspace's, the model's weights are the student's
    ev = f"mlflow/{exp.experiment_id}/{steps['evaluate']}/artifacts/"
    keys = _keys(s3, ev)
    assert {ev + "metrics.json", ev + "evaluation.json", ev + "leaderboard.md"} <= keys
    assert any(k.endswith(".png") for k in keys)  # the plots
    body = s3.client().get_object(Bucket=s3.bucket, Key=ev + "metrics.json")["Body"].read()
    assert json.loads(body) == json.loads((smoke_run["root"] / "reports" / "metrics.json").read_text())

    mv = client.get_model_version(reg["model_name"], reg["version"])
    model_id = mv.model_id or mv.source.removeprefix("models:/")  # over REST only the source (models:/m-...) says
    location = client.get_logged_model(model_id).artifact_location  # mlflow-artifacts:/<exp>/models/m-.../artifacts
    model = "mlflow/" + location.split(":", 1)[1].lstrip("/") + "/"
    keys = _keys(s3, model)
    assert model + "MLmodel" in keys
    weights = s3.client().get_object(Bucket=s3.bucket, Key=model + "artifacts/student/model.safetensors")["Body"].read()
    assert weights == (smoke_run["root"] / "artifacts" / "student" / "model.safetensors").read_bytes()


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # credentials only where given
    env = {**base, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org", **(env or {})}
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


def test_dvc_push_then_pull_into_a_fresh_clone(tracking_server, tmp_path):
    s3, dvc = S3Store(**tracking_server["s3"]), BIN / "dvc"
    repo = tmp_path / "repo"
    (repo / "data" / "images").mkdir(parents=True)
    (repo / "data" / "images" / "x.bin").write_bytes(os.urandom(70_000))
    (repo / "data" / "captions.jsonl").write_text('{"id": 1, "caption": "chest X-ray"}\n')
    # a pipeline output too: DVC pushes what a stage produced, not only what was added
    (repo / "dvc.yaml").write_text(
        "stages:\n  count:\n"
        f"    cmd: {sys.executable} -c \"import os; os.makedirs('out', exist_ok=True); "
        "open('out/n.txt', 'w').write(str(len(os.listdir('data'))))\"\n"
        "    deps: [data]\n    outs: [out]\n")
    _run(["git", "init", "-q"], repo)
    _run([dvc, "init", "-q"], repo)
    _run([dvc, "add", "-q", "data"], repo)
    _run([dvc, "repro", "-q"], repo)
    _run([dvc, "remote", "add", "-d", "store", f"s3://{s3.bucket}/dvc-test"], repo)
    _run([dvc, "remote", "modify", "store", "endpointurl", s3.endpoint], repo)
    _run([dvc, "remote", "modify", "--local", "store", "access_key_id", s3.access_key], repo)
    _run([dvc, "remote", "modify", "--local", "store", "secret_access_key", s3.secret_key], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "data and pipeline"], repo)
    tracked = _run(["git", "ls-files"], repo).split()
    assert ".dvc/config.local" not in tracked
    assert not any(s3.secret_key in (repo / f).read_text(errors="ignore") for f in tracked)
    _run([dvc, "push", "-q"], repo)
    assert _keys(s3, "dvc-test/files/md5/")  # in the bucket, content-addressed

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", repo, clone], tmp_path)
    assert not (clone / "data").exists()
    # a teammate's clone has no config.local: the keys come from the environment
    _run([dvc, "pull", "-q"], clone, env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    for rel in ["data/images/x.bin", "data/captions.jsonl", "out/n.txt"]:
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def auth_server(tracking_server, tmp_path_factory):
    """MLflow's basic-auth app as a team runs it on a host (mlflow_server/team.sh), on the session's PostgreSQL
    (databases of its own for runs and for users) and S3 bucket (a prefix of its own)."""
    root = tmp_path_factory.mktemp("auth-server")
    pg, s3 = tracking_server["postgres_uri"], S3Store(**tracking_server["s3"])
    admin, port, log = {"username": "admin", "password": secrets.token_urlsafe(16)}, free_port(), root / "server.log"
    env = {**os.environ, **s3.env(), "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1", "MLFLOW_BACKEND_STORE_URI": database(pg, "mlflow_auth_runs"),
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{s3.bucket}/auth-test",
           "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(root / "auth.ini", database(pg, "mlflow_auth_users"))),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin["password"], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24)}
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "mlflow_server" / "team.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield {"uri": f"http://127.0.0.1:{port}", "admin": admin, "s3": s3}
    finally:
        stop(proc, timeout=10)


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")  # imported by get_app_client
def test_auth_refuses_strangers_and_lets_users_log_and_register(auth_server, monkeypatch, tmp_path):
    uri, admin = auth_server["uri"], auth_server["admin"]
    api = uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(api, timeout=30).status_code == 401
    assert requests.get(api, auth=(admin["username"], "wrong"), timeout=30).status_code == 401
    assert requests.get(api, auth=(admin["username"], admin["password"]), timeout=30).status_code == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin["username"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin["password"])
    from mlflow.server import get_app_client

    password = secrets.token_urlsafe(12)
    get_app_client("basic-auth", tracking_uri=uri).create_user("alice", password)
    admins_only = MlflowClient(uri).create_experiment("admins-only")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("alice"))
    client.log_metric(run.info.run_id, "acc", 0.9)
    (model := tmp_path / "model").mkdir()
    (model / "weights.txt").write_text("w")
    client.log_artifacts(run.info.run_id, str(model), "model")  # through the server to S3
    client.set_terminated(run.info.run_id)
    client.create_registered_model("alice-model")
    mv = client.create_model_version("alice-model", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert mv.version == "1"
    assert client.get_run(run.info.run_id).data.metrics["acc"] == 0.9
    assert any(k.endswith("/model/weights.txt") for k in _keys(auth_server["s3"], "auth-test/"))
    # default_permission READ: alice sees the admin's experiment but cannot write to it
    assert client.get_experiment(admins_only).name == "admins-only"
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        client.create_run(admins_only)
