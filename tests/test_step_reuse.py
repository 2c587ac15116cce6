"""Step reuse in flows: a step whose inputs, params and code are unchanged is skipped, by content fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mmkd.steps import Context, run_step
from mmkd.steps import reuse as reuse_mod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ws(smoke_corpus, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(smoke_corpus, root)
    return root


def _set_param(root: Path, old: str, new: str) -> None:
    params = root / "params.yaml"
    text = params.read_text()
    assert text.count(old) == 1, old
    params.write_text(text.replace(old, new))


def test_step_io_declares_what_each_dvc_stage_reads_and_writes():
    """One description of each step's inputs, params and outputs: dvc.yaml's stages and the flow's fingerprints."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    ctx = Context.load(REPO)
    assert set(stages) == set(reuse_mod.STEP_IO)
    for name, stage in stages.items():
        io = reuse_mod.STEP_IO[name]
        rel = lambda paths: {reuse_mod._rel(ctx, p) for p in paths}  # noqa: E731
        workspace_deps = {d for d in stage["deps"] if not d.startswith("src/")}
        declared = rel(io.inputs(ctx))
        dvc_only = set(io.notes.get("dvc_only_inputs", ()))
        # data/eval/embedded lies inside data/eval: DVC's one dependency covers both
        assert workspace_deps - dvc_only == {d for d in declared if d != "data/eval/embedded"}, name
        assert set(stage["params"]) - {"profile", "profiles"} == set(io.params) - {"paths", "tracking"}, name
        outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])}
        assert outs <= rel(io.outputs(ctx)), name


def test_a_flow_step_is_skipped_while_unchanged_and_runs_when_anything_it_depends_on_changes(ws):
    from mlflow import MlflowClient

    ctx = Context.load(ws)
    first = run_step("curate", ctx)  # as `mmkd stage curate`: it runs, and records its fingerprint
    assert not first["skipped"]
    again = run_step("curate", Context.load(ws), reuse=True)
    assert again["skipped"] and again["summary"] == json.loads(json.dumps(first["summary"], default=str))
    assert again["reused_run_id"] == first["run_id"]
    run = MlflowClient(ctx.tracker().uri).get_run(again["run_id"])
    assert run.data.tags["mmkd.skipped"] == "true" and run.data.tags["mmkd.fingerprint"] == again["fingerprint"]
    assert run.data.tags["mmkd.reused_run_id"] == first["run_id"]
    # without reuse (mmkd stage, DVC), a step always runs
    assert not run_step("curate", Context.load(ws))["skipped"]
    assert run_step("curate", Context.load(ws), reuse=True)["skipped"]

    # a param it reads
    _set_param(ws, "  min_side: 16 ", "  min_side: 15 ")
    assert not run_step("curate", Context.load(ws), reuse=True)["skipped"]
    assert run_step("curate", Context.load(ws), reuse=True)["skipped"]
    # a param it does not read leaves it skipped
    _set_param(ws, "  lock_wait_s: 10 ", "  lock_wait_s: 11 ")
    assert run_step("curate", Context.load(ws), reuse=True)["skipped"]
    # an input's content (same size, same name)
    manifest = ws / "data" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    fp, record, why = reuse_mod.reusable(Context.load(ws), "curate")
    assert record is None and why == "inputs changed: data"
    assert not run_step("curate", Context.load(ws), reuse=True)["skipped"]
    # an output changed or deleted since
    (ws / "artifacts" / "curated" / "summary.json").unlink()
    fp, record, why = reuse_mod.reusable(Context.load(ws), "curate")
    assert record is None and why == "outputs changed since: artifacts/curated"
    assert not run_step("curate", Context.load(ws), reuse=True)["skipped"]
    # the code: a different library digest
    reuse_mod_code = reuse_mod.code_digest()
    try:
        import mmkd.steps.fingerprint as fpm

        fpm._CODE = "another version of the code"
        fp, record, why = reuse_mod.reusable(Context.load(ws), "curate")
        assert record is None and why == "code changed"
    finally:
        fpm._CODE = reuse_mod_code
    # the switch
    _set_param(ws, "  skip_unchanged: true ", "  skip_unchanged: false ")
    assert not run_step("curate", Context.load(ws), reuse=True)["skipped"]


def test_a_step_that_fails_leaves_no_record_and_runs_again(ws, monkeypatch):
    import mmkd.steps as steps

    ctx = Context.load(ws)
    run_step("curate", ctx)
    assert reuse_mod.record_path(ctx, "curate").exists()
    real = steps.STEPS["curate"]

    def half_done(ctx, run):
        real(ctx, run)
        raise RuntimeError("killed after writing")

    monkeypatch.setitem(steps.STEPS, "curate", half_done)
    _set_param(ws, "  min_side: 16 ", "  min_side: 15 ")  # so that the flow's step runs
    with pytest.raises(RuntimeError):
        run_step("curate", Context.load(ws), reuse=True)
    assert not reuse_mod.record_path(ctx, "curate").exists()
    monkeypatch.setitem(steps.STEPS, "curate", real)
    assert not run_step("curate", Context.load(ws), reuse=True)["skipped"]


def test_fingerprints_ignore_where_the_workspace_lives_and_temp_files(ws, tmp_path):
    from mmkd.steps.fingerprint import HashCache, tree_digest

    ctx = Context.load(ws)
    with HashCache(None) as cache:
        before = reuse_mod.fingerprint(ctx, "validate", cache)
    (ws / "artifacts" / "curated" / ".summary.json.123.tmp").write_text("half")
    moved = tmp_path / "elsewhere"
    shutil.copytree(ws, moved)
    with HashCache(moved / reuse_mod.HASHES) as cache:
        assert reuse_mod.fingerprint(Context.load(moved), "validate", cache)["id"] == before["id"]
        # the cached digest is used while (inode, size, mtime) hold, and recomputed when they change
        f = moved / "artifacts" / "curated" / "summary.json"
        first = tree_digest(f, cache)
        f.write_text(f.read_text() + " ")
        assert tree_digest(f, cache) != first
    assert tree_digest(tmp_path / "nothing", HashCache(None)) == "absent"


def test_reused_teachers_are_checked_against_new_curated_records(smoke_run, tmp_path):
    """Teachers trained on their own corpora do not depend on the curated store, but a curated image with the
    pixels of a teacher's corpus sample must still stop the flow, skipped teachers or not."""
    from mmkd.data.teacher_corpus import TeacherCorpusError

    root = tmp_path / "ws"
    shutil.copytree(smoke_run["root"], root)
    ctx = Context.load(root)
    assert run_step("teachers", ctx, reuse=True)["skipped"]  # the smoke flow's teachers, in a copied workspace
    keys = json.loads((root / "artifacts" / "teachers" / "corpus_keys.json").read_text())
    stolen = keys["path-clip"][3]
    manifest = root / "artifacts" / "curated" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["key"] = stolen
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TeacherCorpusError, match=f"teacher 'path-clip'.*{rows[0]['id']}"):
        run_step("teachers", Context.load(root), reuse=True)
