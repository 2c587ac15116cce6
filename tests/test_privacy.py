"""Privacy tests: nothing identifying leaves curation (captions, group tokens, the quarantine logged to MLflow)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.config import SourceCfg, SynthCfg, Workspace, load_params
from mmkd.data.curate import curate
from mmkd.data.deid import deidentify
from mmkd.data.manifest import read_manifest
from mmkd.data.splits import KEY_ENV, SECRET_FILE, group_token, hashed_split, key_id, rekey_needed, workspace_key
from mmkd.data.synth import generate

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_deid", REPO / "bench" / "deid.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# measured with bench/deid.py on tests/data/deid_sentences.jsonl (docs/benchmarks.md): every kind 1.00 but
# other_id 0.80; the floors leave a miss of slack on the larger kinds, none on the small ones (1.0 by default)
RECALL_FLOOR = {"name": 0.95, "date": 0.95, "address": 0.92, "age": 0.9, "mrn": 0.9, "phone": 0.9,
                "other_id": 0.8}
FP_CEILING = 0.02          # share of identifier-free sentences changed (measured 0.000)
PLANTED = ("John", "Smith", "48213390", "617-555-0199", "1931", "jsmith@example.org")


def test_recall_per_identifier_kind_and_false_positives_on_medical_terms():
    rows = [json.loads(line) for line in (REPO / "tests" / "data" / "deid_sentences.jsonl").read_text().splitlines()]
    assert len(rows) >= 200 and sum(not r["phi"] for r in rows) >= 100
    new, old = bench.evaluate(deidentify, rows), bench.evaluate(bench.legacy_scrub, rows)
    for kind, recall in new["recall"].items():
        assert recall >= RECALL_FLOOR.get(kind, 1.0), (kind, recall)
    assert new["recall_all"] >= 0.98 > old["recall_all"] + 0.4
    assert new["fp_rate"] <= FP_CEILING, new["fp_sentences"]
    assert new["lost_words"] <= 1, new["lost"]
    # the held-out sentences, written after the rules were frozen (measured: 0.971 recall, no false positive)
    held = [json.loads(line) for line in (REPO / "tests" / "data" / "deid_heldout.jsonl").read_text().splitlines()]
    held_new = bench.evaluate(deidentify, held)
    assert held_new["recall_all"] >= 0.95 and held_new["fp_rate"] <= FP_CEILING, held_new
    # the embedded corpus' captions carry no identifier: de-identification leaves every one as it is
    captions = bench.default_captions(2000)
    assert [deidentify(c)[0] for c in captions] == captions


def test_scrub_keeps_its_contract_and_counts_kinds():
    from mmkd.data.clean import scrub

    text, counts = scrub("Mrs. Ada Byrne, 94-year-old, seen 12 March 2021 at 14 Elm Street, Boston, MA 02115; "
                         "fax (617) 555-0199; see https://pacs.example.org/s/1 from 10.0.0.7; MRN: A1234567")
    assert counts == {"name": 1, "age": 1, "date": 1, "address": 2, "zip": 1, "phone": 1, "url": 1, "ip": 1,
                      "record_number": 1}, (text, counts)
    for planted in ("Ada", "Byrne", "94", "March", "Elm", "Boston", "02115", "555", "pacs", "10.0.0.7", "A1234567"):
        assert planted not in text
    assert scrub("Hodgkin lymphoma, IDH1-mutant glioma, T2-weighted, C5-C6, grade 3, 4 cm, 60 Gy, 2019") == (
        "Hodgkin lymphoma, IDH1-mutant glioma, T2-weighted, C5-C6, grade 3, 4 cm, 60 Gy, 2019", {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tiny embedded corpus plus grouped records without a declared split (split by group hash) and a bad row
    carrying planted identifiers in every field (caption, id, group, image path) and an invalid JSON line."""
    root = tmp_path_factory.mktemp("privacy") / "data"
    generate(SynthCfg(image_size=40, modalities=["xray"], train_per_modality=4, probe_per_modality=4,
                      test_per_modality=4, workers=1), 0, root)
    rng = np.random.default_rng(7)
    lines = []
    for i in range(18):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"g{i}.png")
        lines.append({"id": f"g{i}", "image": f"images/g{i}.png", "caption": f"a frontal chest X-ray number {i}",
                      "modality": "xray", "group": f"P{i % 6:03d}"})
    lines.append({"id": "PAT-John-Smith-48213390", "image": "images/Smith_John/1931.png", "modality": "xray",
                  "group": "Smith, John (DOB 1931)", "caption": "Chest X-ray of John Smith, MRN 48213390, "
                  "call 617-555-0199 or jsmith@example.org", "labels": {"mrn": 48213390}})
    with open(root / "manifest.jsonl", "a") as fh:
        fh.write("".join(json.dumps(line) + "\n" for line in lines))
        fh.write('{"id": "John Smith 48213390", "caption": "John Smith, 617-555-0199, jsmith@example.org\n')
    return root


def _cfg(**kw):
    return load_params(REPO / "params.yaml").curate.model_copy(
        update={"workers": 0, "sources": [SourceCfg(name="embedded", kind="synthetic", path=".")],
                "decoded_sizes": [32], **kw})


def test_group_tokens_are_keyed_per_workspace_and_splits_are_not(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    for ws in ("a", "b"):
        (tmp_path / ws).mkdir()
    keys = [workspace_key(tmp_path / ws) for ws in ("a", "b")]
    assert keys[0] != keys[1] and workspace_key(tmp_path / "a") == keys[0]   # created once, then read
    runs = []
    for i, key in enumerate([*keys, None]):
        curate(corpus, tmp_path / f"c{i}", _cfg(group_key=key))
        runs.append({r["id"]: r for r in read_manifest(tmp_path / f"c{i}" / "manifest.jsonl")})
    assert set(runs[0]) == set(runs[1]) == set(runs[2]) and len(runs[0]) == 30
    for rid in runs[0]:
        # the split (and how it was found) does not depend on the secret: another clone gets the same splits, and
        # the same as before tokens were keyed (key None: the unkeyed hash the landed code stored)
        assert runs[0][rid]["split"] == runs[1][rid]["split"] == runs[2][rid]["split"], rid
        assert runs[0][rid]["group"] != runs[1][rid]["group"] != runs[2][rid]["group"]
    hashed = [r for r in runs[0].values() if r["id"].startswith("g")]
    assert {r["split_from"] for r in hashed} <= {"hashed", "group"} and len({r["split"] for r in hashed}) > 1
    by_group = {}
    for r in hashed:  # one patient, one split, one token
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert len(by_group) == 6 and all(len(s) == 1 for s in by_group.values())
    # the unkeyed token is brute-forceable from a short id; the keyed one is not without the secret
    guess = {group_token("embedded", f"P{i:03d}", "").draw: f"P{i:03d}" for i in range(1000)}
    assert sum(r["group"] in guess for r in hashed) == 0 and sum(r["group"] in guess for r in runs[2].values()) == 18
    assert hashed_split(group_token("s", "P1", "", keys[0]), {"train": .5, "test": .5}) == \
        hashed_split(group_token("s", "P1", "", keys[1]), {"train": .5, "test": .5})


def _key_in(root: str, out) -> None:
    out.put(workspace_key(Path(root)).hex())


def test_secret_file_is_0600_gitignored_shared_by_concurrent_runs_and_overridable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_key_in, args=(str(tmp_path), out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = {out.get(timeout=60) for _ in procs}
    for p in procs:
        p.join()
    path = tmp_path / SECRET_FILE
    assert got == {path.read_bytes().hex()} and len(path.read_bytes()) == 32   # every racer got the one key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret"]                 # no temp left
    assert subprocess.run(["git", "check-ignore", "-q", str(SECRET_FILE)], cwd=REPO).returncode == 0
    os.chmod(path, 0o644)
    workspace_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600                            # tightened again
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert workspace_key(tmp_path / "other") == bytes.fromhex("ab" * 32) and not (tmp_path / "other").exists()
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(ValueError, match=KEY_ENV):
        workspace_key(tmp_path)


def test_quarantine_logged_to_mlflow_holds_no_identifier_and_the_local_file_keeps_everything(corpus, tmp_path,
                                                                                              monkeypatch):
    from mmkd.steps.common import Context
    from mmkd.steps.curate import step_curate

    monkeypatch.delenv(KEY_ENV, raising=False)
    root = tmp_path / "ws"
    shutil.copytree(corpus, root / "data")
    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"curate": _cfg()})

    class Run:  # what step_curate hands to MLflow, captured as the tracking server would store it
        def __init__(self):
            self.artifacts, self.params = {}, {}

        def log_params(self, p):
            self.params.update(p)

        def log_metrics(self, m, step=None):
            pass

        def log_artifact(self, path):
            self.artifacts[Path(path).name] = Path(path).read_text()

    run, ctx = Run(), Context(Workspace(root, params), REPO / "params.yaml")
    summary = step_curate(ctx, run)
    assert summary["quarantined"] == 2
    logged = run.artifacts["quarantine.jsonl"]
    local = (Workspace(root, params).curated / "quarantine.jsonl").read_text()
    for planted in PLANTED:
        assert planted not in logged, planted
        assert planted in local, planted                                        # nothing lost locally
    assert "group_key" not in json.dumps(run.params, default=str)               # the secret is never logged
    rows = [json.loads(line) for line in logged.splitlines()]
    assert sorted(r["category"] for r in rows) == ["image file not found", "invalid JSON"]
    assert all(r["line"] and r["source"] == "embedded" for r in rows)
    # the store records which key its tokens are under; another key means re-tokenising from scratch
    curated = Workspace(root, params).curated
    assert not rekey_needed(curated, workspace_key(root)) and rekey_needed(curated, b"another key of 16+ bytes")
    assert (curated / "group_key.id").read_text() == key_id(workspace_key(root))
    before = {r["id"]: r for r in read_manifest(curated / "manifest.jsonl")}
    monkeypatch.setenv(KEY_ENV, "cd" * 32)                 # the team's shared key replaces the workspace's own
    again = step_curate(ctx, Run())
    after = {r["id"]: r for r in read_manifest(curated / "manifest.jsonl")}
    assert again["reused"] == 0 and again["kept"] == summary["kept"]    # re-tokenised from scratch, not mixed
    assert all(after[i]["split"] == r["split"] and after[i]["group"] != r["group"] for i, r in before.items())
    third = step_curate(ctx, Run())                                     # then incremental again
    assert third["decoded"] == 0 and third["reused"] >= third["kept"]
