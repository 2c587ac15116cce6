"""Shared fixtures: an isolated Prefect home and MLflow store, tiny workspaces, and the smoke pipeline run once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

# Isolate Prefect and MLflow before either is imported anywhere in the session.
_PREFECT_HOME = tempfile.mkdtemp(prefix="mmkd-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MMKD_PARENT_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]


def write_params(root: Path, profile: str = "smoke", tracking_uri: str | None = None) -> Path:
    """A copy of the repo's params.yaml in root, pinned to a profile (and to a tracking server, if given)."""
    text = (REPO / "params.yaml").read_text().replace("profile: default", f"profile: {profile}", 1)
    if tracking_uri:
        text = text.replace("  tracking_uri: null", f"  tracking_uri: {tracking_uri}", 1)
    path = root / "params.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory) -> Path:
    """A workspace with the smoke corpus generated and curated (no training)."""
    from mmkd.steps import Context, run_step

    root = tmp_path_factory.mktemp("corpus")
    write_params(root)
    ctx = Context.load(root)
    run_step("synth", ctx)
    run_step("curate", ctx)
    return root


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory) -> Iterator[dict]:
    """The team MLflow stack for the session, on 127.0.0.1: PostgreSQL backend, SeaweedFS S3 artifacts.

    {"uri", "env" (what a client needs), "log", "postgres_uri", "s3": {"endpoint", "bucket", "access_key",
    "secret_key"}}; clients reach artifacts through the server, only the server (and DVC) hold the S3 keys."""
    from tests.servers import team_server

    with team_server(tmp_path_factory.mktemp("tracking-server")) as server:
        yield server


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, prefect_harness, tracking_server) -> dict:
    """The whole smoke flow, run once through Prefect, in a fresh workspace, logged to the session's tracking server."""
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("smoke")
    params = write_params(root, tracking_uri=tracking_server["uri"])
    result = retrain(profile="smoke", root=str(root), params_path=str(params))
    return {"root": root, "result": result, "tracking_uri": tracking_server["uri"]}


@pytest.fixture()
def offline_empty_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE and an empty hub cache, for tests that load teachers the Hugging Face way."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    # huggingface_hub reads HF_HOME at import; its lookups use this module attribute
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def workspace(tmp_path) -> Path:
    write_params(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def model_server(smoke_run, tmp_path_factory):
    """`mlflow models serve` on the smoke run's champion, shared by tests/test_serving.py and
    tests/faults/test_serving_burst.py; it starts (~10 s) while the tests that do not need it yet run."""
    from tests.servers import ModelServer

    server = ModelServer(smoke_run["tracking_uri"], tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_serving_burst(items):
    """tests/faults/test_serving_burst.py runs right after tests/test_serving.py: they share `model_server`, whose
    start (~10 s) then overlaps test_serving's CLI tests instead of stalling the burst."""
    burst = [i for i in items if i.nodeid.startswith("tests/faults/test_serving_burst.py")]
    serving = [i for i in items if i.nodeid.startswith("tests/test_serving.py")]
    if burst and serving:
        rest = [i for i in items if i not in burst]
        k = rest.index(serving[-1]) + 1
        items[:] = rest[:k] + burst + rest[k:]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
