"""The inbox: drops found, planned, ingested once into data/; and the inbox flow retraining on new pairs only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmkd.data.inbox import InboxError, drop_state, ingest_drop, ingested_drops, pending_drops, plan_drop


def make_drop(folder: Path, n: int, seed: int = 7777, bad_rows: bool = False, csv: bool = False) -> list[dict]:
    """A drop of n new synthetic pairs (an rng key no corpus uses), optionally with two bad rows."""
    from mmkd.data.synth import render_sample

    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        modality = ("xray", "pathology", "fundus")[i % 3]
        img, rec = render_sample(seed, modality, "train", i, 64, 0.7)
        name = f"img/{modality}-{i:03d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / name)
        rows.append({"id": f"drop{seed}-{i:03d}", "image": name, "caption": rec["caption"],
                     "modality": modality, "split": "train"})
    if csv:
        import csv as csvlib

        with open(folder / "manifest.csv", "w", newline="") as fh:
            w = csvlib.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return rows
    lines = [json.dumps(r) for r in rows]
    if bad_rows:
        lines.append(json.dumps({"id": f"drop{seed}-missing", "image": "img/not-there.png",
                                 "caption": "a chest x-ray with no image file", "modality": "xray"}))
        lines.append('{"id": "broken json", ')
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return rows


def test_pending_drops_wait_for_a_manifest_and_skip_processed(tmp_path):
    inbox = tmp_path / "inbox"
    make_drop(inbox / "b-drop", 2)
    (inbox / "a-incomplete" / "img").mkdir(parents=True)
    (inbox / "processed" / "old").mkdir(parents=True)
    (inbox / ".hidden").mkdir()
    ready, waiting = pending_drops(inbox, "processed")
    assert [d.name for d in ready] == ["b-drop"] and [d.name for d in waiting] == ["a-incomplete"]
    assert pending_drops(tmp_path / "absent") == ([], [])


def test_ingest_copies_rewrites_paths_archives_and_is_idempotent(tmp_path):
    inbox, data = tmp_path / "inbox", tmp_path / "data"
    rows = make_drop(inbox / "drop1", 3, bad_rows=True)
    plan = plan_drop(inbox / "drop1")
    assert plan.drop_id.startswith("drop1-") and plan.manifest == "manifest.jsonl" and len(plan.files) == 3
    manifest = data / "inbox" / "manifest.jsonl"
    out = ingest_drop(plan, manifest, inbox / "processed")
    assert out["rows"] == 5 and not out["already_ingested"]
    assert not (inbox / "drop1").exists() and (inbox / "processed" / plan.drop_id / "manifest.jsonl").exists()
    lines = manifest.read_bytes().splitlines()
    assert len(lines) == 5 and lines[-1] == b'{"id": "broken json", '  # kept as it came: curation quarantines it
    first = json.loads(lines[0])
    assert first["image"] == f"{plan.drop_id}/{rows[0]['image']}" and first["inbox_drop"] == plan.drop_id
    assert (data / "inbox" / first["image"]).read_bytes() == \
        (inbox / "processed" / plan.drop_id / rows[0]["image"]).read_bytes()
    assert ingested_drops(manifest) == {plan.content_hash: plan.drop_id}
    # the same files again, under another name: recognised by their hash, archived, nothing appended
    shutil.copytree(inbox / "processed" / plan.drop_id, inbox / "drop1-again")
    again = ingest_drop(plan_drop(inbox / "drop1-again"), manifest, inbox / "processed")
    assert again["already_ingested"] and again["drop_id"] == plan.drop_id
    assert len(manifest.read_bytes().splitlines()) == 5


def test_csv_drop_and_a_drop_without_manifest(tmp_path):
    make_drop(tmp_path / "c", 2, csv=True)
    plan = plan_drop(tmp_path / "c")
    out = ingest_drop(plan, tmp_path / "data" / "manifest.jsonl", tmp_path / "done")
    rows = [json.loads(x) for x in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert out["rows"] == 2 and rows[1]["image"].startswith(plan.drop_id + "/img/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InboxError, match="expected one of"):
        plan_drop(tmp_path / "empty")


def test_links_are_refused_naming_the_link_and_nothing_outside_the_drop_is_read(tmp_path):
    """A link planted in a drop (to a credentials file), a drop that is itself a link, and a file swapped for a link
    after planning: each refused with the link named; nothing reaches data/."""
    inbox, manifest = tmp_path / "inbox", tmp_path / "data" / "inbox" / "manifest.jsonl"
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2\n")
    make_drop(inbox / "planted", 2)
    (inbox / "planted" / "img" / "extra.png").symlink_to(secret)
    with pytest.raises(InboxError, match=r"img/extra.png is a symbolic link \(to .*credentials\)"):
        plan_drop(inbox / "planted")
    make_drop(tmp_path / "elsewhere", 2)
    (inbox / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert [d.name for d in pending_drops(inbox)[0]] == ["linked", "planted"]  # listed, so refused with a reason
    with pytest.raises(InboxError, match="linked is a symbolic link"):
        plan_drop(inbox / "linked")
    assert drop_state(inbox / "linked") == [(".", 0, 0, os.lstat(inbox / "linked").st_mode)]  # the cache key
    make_drop(inbox / "swapped", 2)
    plan = plan_drop(inbox / "swapped")  # planned clean (the flow caches plans) ...
    victim = inbox / "swapped" / plan.files[0]
    victim.unlink()
    victim.symlink_to(secret)  # ... then a file replaced by a link before ingestion
    with pytest.raises(InboxError, match=f"{plan.files[0]}"):
        ingest_drop(plan, manifest, inbox / "processed")
    assert not manifest.exists() and not any(manifest.parent.glob("*/img/*"))
    assert "hunter2" not in "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                                    and not p.is_symlink() and p != secret)


def test_a_drop_changed_after_planning_waits_and_an_interrupted_one_is_completed(tmp_path):
    inbox, manifest = tmp_path / "inbox", tmp_path / "data" / "inbox" / "manifest.jsonl"
    make_drop(inbox / "d", 3)
    plan = plan_drop(inbox / "d")
    (inbox / "d" / plan.files[0]).write_bytes(b"other bytes")
    with pytest.raises(InboxError, match="changed after it was planned"):
        ingest_drop(plan, manifest, inbox / "processed")
    assert (inbox / "d").is_dir() and not manifest.exists() and not list(manifest.parent.iterdir())
    # rows written, archiving interrupted (the state a kill leaves): the next run archives it and says so
    plan = plan_drop(inbox / "d")
    out = ingest_drop(plan, manifest, inbox / "processed")
    shutil.move(out["processed"], inbox / "d")
    again = ingest_drop(plan_drop(inbox / "d"), manifest, inbox / "processed")
    assert again["recovered"] and not again["already_ingested"] and again["drop_id"] == plan.drop_id
    assert len(manifest.read_text().splitlines()) == 3 and not (inbox / "d").exists()


def test_inbox_config_requires_an_optional_manifest_source(workspace):
    from mmkd.config import ConfigError, load_params

    path = workspace / "params.yaml"
    path.write_text(path.read_text().replace("path: inbox/manifest.jsonl, optional: true", "path: inbox/manifest.jsonl"))
    with pytest.raises(ConfigError, match="inbox.source"):
        load_params(path)


def _dvc(root: Path, *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_drop_is_versioned_cached_incrementally_retrained_and_gated(smoke_run, tmp_path, prefect_harness):
    """A copy of the smoke workspace (its champion registered) gets a drop: only the new pairs are decoded and sent
    through the teachers, data.dvc names the new data version, and a new model version meets the gate."""
    from mlflow import MlflowClient

    from flows.inbox import inbox
    from mmkd.steps import Context, run_step

    src, root = smoke_run["root"], tmp_path / "ws"
    shutil.copytree(src, root)
    params = root / "params.yaml"  # a model name of its own: the session's mmkd-student stays as the smoke run left it
    params.write_text(params.read_text().replace("model_name: mmkd-student", "model_name: mmkd-student-inbox", 1))
    ctx = Context.load(root)
    assert ctx.params.register_.model_name == "mmkd-student-inbox"
    run_step("register", ctx)  # v1: the workspace's current student, the champion to beat
    _dvc(root, "init", "--no-scm", "-q")
    _dvc(root, "add", "-q", "data")
    before = (root / "data.dvc").read_text()
    rows_before = sum(1 for _ in open(root / "artifacts" / "curated" / "manifest.jsonl"))
    teachers_before = (root / "artifacts" / "teachers" / "teachers.json").read_bytes()

    n_new = 6
    make_drop(root / "inbox" / "drop-1", n_new, bad_rows=True)
    result = inbox(root=str(root))

    assert result["retrained"] and [d["rows"] for d in result["drops"]] == [n_new + 2]
    after = (root / "data.dvc").read_text()
    assert after != before and result["data_version"] in after
    steps = result["retrain"]["summaries"]
    # curation: the new pairs added, the two bad rows quarantined with their reasons, the old store reused
    rows_after = sum(1 for _ in open(root / "artifacts" / "curated" / "manifest.jsonl"))
    assert rows_after == rows_before + n_new
    quarantine = (root / "artifacts" / "curated" / "quarantine.jsonl").read_text()
    assert "not-there.png" in quarantine and "invalid JSON" in quarantine
    # the teachers (their own corpora, same params and code) are not trained again: the step is skipped, recorded
    # as such with its fingerprint; their features stay valid, only the new pairs are sent through them
    assert (root / "artifacts" / "teachers" / "teachers.json").read_bytes() == teachers_before
    assert result["retrain"]["skipped"] == ["teachers"]
    client = MlflowClient(smoke_run["tracking_uri"], registry_uri=smoke_run["tracking_uri"])
    skipped = client.get_run(result["retrain"]["run_ids"]["teachers"])
    assert skipped.data.tags["mmkd.skipped"] == "true" and skipped.data.tags["mmkd.fingerprint"]
    assert skipped.data.tags["mlflow.parentRunId"] == result["retrain"]["parent_run_id"]
    cached = steps["cache_features"]
    assert {k: v for k, v in cached.items() if k.startswith("forwarded_")} == \
        {f"forwarded_{t.name}": n_new for t in ctx.params.teachers.registry}
    # a new version, gated against the champion, recorded with the data version and why the run happened
    reg = result["retrain"]["registration"]
    assert reg["version"] == "2" and reg["previous_champion_version"] == "1" and reg["champion_score"] is not None
    assert reg["champion_version"] == ("2" if reg["promoted"] else "1") and reg["reason"]
    v2 = client.get_model_version("mmkd-student-inbox", "2")
    assert v2.tags["mmkd.data_version"] == result["data_version"] == reg["data_version"]
    assert v2.tags["mmkd.gate_decision"] == ("promoted" if reg["promoted"] else "held")
    parent = client.get_run(result["retrain"]["parent_run_id"])
    assert parent.data.tags["mmkd.trigger"] == "inbox" and result["drops"][0]["drop_id"] in parent.data.tags["mmkd.note"]
    assert parent.data.tags["mmkd.data_hash"] == result["data_version"]
    # the drop is archived; an empty inbox, and the same drop put in again, retrain nothing
    processed = root / "inbox" / "processed" / result["drops"][0]["drop_id"]
    assert processed.is_dir() and not (root / "inbox" / "drop-1").exists()
    shutil.copytree(processed, root / "inbox" / "drop-1-again")
    again = inbox(root=str(root))
    assert not again["retrained"] and again["drops"][0]["already_ingested"]
    assert inbox(root=str(root)) == {"drops": [], "refused": {}, "retrained": False}


def test_cli_inbox_reports_a_refused_drop(workspace, prefect_harness):
    from typer.testing import CliRunner

    from mmkd.cli import app

    (workspace / "inbox" / "no-manifest-but-two").mkdir(parents=True)
    for name in ("manifest.jsonl", "manifest.csv"):
        (workspace / "inbox" / "no-manifest-but-two" / name).write_text("")
    res = CliRunner().invoke(app, ["inbox", "--root", str(workspace)])
    assert res.exit_code == 1 and "refused" in res.output and "expected one of" in res.output
    assert (workspace / "inbox" / "no-manifest-but-two").is_dir()  # left where it was
