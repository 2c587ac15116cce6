"""The feature store inside the pipeline: cache_features on a Dask cluster, and `mmkd features stats` on the smoke run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tests.test_feature_store import all_features


def test_dask_executor_runs_units_in_worker_processes(smoke_run, tmp_path, prefect_harness):
    """cache_features through Prefect's Dask task runner on a local 2-worker cluster: same features."""
    from tasks.cache_features import cache_features

    src = smoke_run["root"]
    for sub in ("artifacts/curated", "artifacts/teachers"):
        shutil.copytree(src / sub, tmp_path / sub, symlinks=True)
    text = (src / "params.yaml").read_text().replace("  executor: local", "  executor: dask")
    text = text.replace("  unit_records: 16384", "  unit_records: 100")
    assert "executor: dask" in text
    (tmp_path / "params.yaml").write_text(text)
    out = cache_features(str(tmp_path), str(tmp_path / "params.yaml"), "smoke", None)["summary"]
    assert out["units"] >= 4 and out["worker_processes"] >= 2 and os.getpid()
    curated = tmp_path / "artifacts" / "curated"
    for t in ("rad-clip", "path-clip", "vis-clip", "bio-clip"):
        s1, i1, t1 = all_features(tmp_path / "artifacts" / "features" / "teachers", curated, t)
        s2, i2, t2 = all_features(src / "artifacts" / "features" / "teachers", curated, t)
        assert (s1 >= 0).all() and np.allclose(i1, i2, atol=1e-5) and np.allclose(t1, t2, atol=1e-5)


def test_features_stats_reports_coverage_shards_and_size(smoke_run):
    from typer.testing import CliRunner

    from mmkd.cli import app

    root = smoke_run["root"]
    out = CliRunner().invoke(app, ["features", "stats", "--root", str(root), "--json"])
    assert out.exit_code == 0, out.output
    stats = json.loads(out.output)
    raw = {e["teacher"]: e for e in stats["teachers"]["sets"]}
    assert set(raw) == {"rad-clip", "path-clip", "vis-clip", "bio-clip"}
    assert all(e["coverage"] == {"train": 1.0, "probe": 1.0, "test": 1.0} and e["shards"] >= 1 for e in raw.values())
    assert stats["teachers"]["bytes"] == sum(f.stat().st_size for f in (root / "artifacts/features/teachers").rglob("*")
                                             if f.suffix in (".npy", ".sqlite"))
    assert {e["dim"] for e in stats["aligned"]["sets"]} == {128}
    table = CliRunner().invoke(app, ["features", "stats", "--root", str(root)])
    assert "rad-clip" in table.output and "100.0%" in table.output
