"""Curation on the cluster engine: decoding as Dask work units on a local 2-process cluster gives the store the
single-process run gives, byte for byte (duplicates across partitions, bad records, incremental runs, crashing
decoders), and a partition that fails for another reason fails the run naming it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmkd.config import CurateCfg, SynthCfg
from mmkd.data import curate as curate_mod
from mmkd.data import curate_dask, sources
from mmkd.data.curate import curate
from mmkd.data.curate_dask import decoder, partitions
from mmkd.data.manifest import read_manifest
from mmkd.data.store import CurationError
from mmkd.data.synth import generate
from tests.faults import crash_reader

PART = 4  # records per partition: the corpus spans many partitions, and duplicates cross them
CFG = CurateCfg(workers=0, decoded_sizes=[32], durable=False)


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    # a partition that killed 2 workers is given up on (the default is 3): the crash test stays short
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as c:
            yield c


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_store(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    ta, tb = ({k: v for k, v in _tree(p).items() if k not in skip} for p in (a, b))
    assert sorted(ta) == sorted(tb)
    for rel in ta:
        assert ta[rel] == tb[rel], rel
    assert "manifest.jsonl" in ta and "quarantine.jsonl" in ta and any(r.startswith("shards/") for r in ta)


def _corpus(root: Path) -> Path:
    """The embedded corpus in small, then bad records, exact and near duplicates of early records (other
    partitions), a duplicate id, and a duplicate pair inside one late partition."""
    data = root / "data"
    generate(SynthCfg(image_size=48, modalities=["xray", "pathology"], train_per_modality=6, probe_per_modality=4,
                      test_per_modality=4, workers=1), 0, data)
    good = read_manifest(data / "manifest.jsonl")
    bad = data / "images" / "bad"
    bad.mkdir()
    first = (data / good[0]["image"]).read_bytes()
    (bad / "truncated.png").write_bytes(first[: len(first) // 2])
    (bad / "text.png").write_text("not an image\n")
    (bad / "exact.png").write_bytes(first)
    Image.open(data / good[1]["image"]).convert("RGB").save(bad / "near.jpg", quality=90)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(bad / f"f{i}.png")
    shutil.copy(bad / "f2.png", bad / "f2-copy.png")

    def line(rid, image, caption="a frontal chest X-ray", **kw):
        return json.dumps({"id": rid, "image": image, "caption": caption, "modality": "xray", **kw}) + "\n"

    with open(data / "manifest.jsonl", "a") as fh:
        fh.writelines([line("truncated", "images/bad/truncated.png"), line("text", "images/bad/text.png"),
                       line("exact", "images/bad/exact.png"), line("missing", "images/bad/nowhere.png"),
                       line("near", "images/bad/near.jpg"), line("short", "images/bad/f0.png", caption="x"),
                       line(good[3]["id"], "images/bad/f1.png"), '{"id": "malformed", "image": \n',
                       line("fresh", "images/bad/f0.png"), line("f2", "images/bad/f2.png"),
                       line("f2-copy", "images/bad/f2-copy.png")])
    return data


def test_partitions_are_consecutive_runs_in_source_order():
    parts = list(partitions(iter(range(10)), 4))
    assert parts == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9])]


def test_dask_curation_writes_the_single_process_store_byte_for_byte(client, tmp_path):
    data = _corpus(tmp_path)
    local = curate(data, tmp_path / "local", CFG)
    dask_cfg = CFG.model_copy(update={"executor": "dask", "partition_records": PART})
    remote = curate(data, tmp_path / "dask", dask_cfg, decode=decoder(client, PART))
    assert local == remote
    # the corpus exercises what the driver decides across partitions, not only decoding
    assert {"exact duplicate", "near duplicate", "duplicate id", "invalid JSON", "not an image",
            "image file not found"} <= set(local["quarantine_reasons"])
    assert local["input_records"] > 8 * PART and local["kept"] > 0
    q = {r["id"]: r["reason"] for r in read_manifest(tmp_path / "dask" / "quarantine.jsonl")}
    assert "of 'f2'" in q["f2-copy"]  # the first of the pair is kept, as locally
    _same_store(tmp_path / "local", tmp_path / "dask")
    # the partitions were decoded in the cluster's worker processes, not here
    held = client.run(lambda: (os.getpid(), curate_dask._current))
    assert all(pid != os.getpid() for pid, _ in held.values()) and any(tok for _, tok in held.values())

    # incremental: new records appended; the workers skip what the last run decoded (its fingerprints reach them)
    with open(data / "manifest.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "late", "image": "images/bad/f1.png", "caption": "a lateral chest X-ray",
                             "modality": "xray"}) + "\n")
    again_local = curate(data, tmp_path / "local", CFG)
    again = curate(data, tmp_path / "dask", dask_cfg, decode=decoder(client, PART))
    # reused: every record but the malformed line (no fingerprint: it never parsed)
    assert again == again_local and (again["decoded"], again["reused"]) == (1, local["input_records"] - 1)
    _same_store(tmp_path / "local", tmp_path / "dask")


@pytest.fixture()
def crashy(monkeypatch):
    """The fault tests' reader, registered here: the decoder hands the registration to the Dask workers."""
    monkeypatch.setitem(sources.READERS, crash_reader.KIND, crash_reader.MODULE)


def test_killed_workers_are_retried_and_a_record_that_keeps_killing_is_quarantined_as_locally(client, tmp_path,
                                                                                               crashy, monkeypatch,
                                                                                               caplog):
    cfg = CurateCfg(workers=1, decoded_sizes=[16], min_side=16, durable=False,
                    split_fractions={"train": 1.0, "probe": 0.0, "test": 0.0})
    marks = tmp_path / "marks"  # the same folder for every run: it is part of the records' fingerprints

    def run(out: Path, actions: dict[int, str], decode=None) -> dict:
        shutil.rmtree(marks, ignore_errors=True)
        marks.mkdir()
        recs = [crash_reader.record(i, actions.get(i), marks) for i in range(14)]
        monkeypatch.setattr(curate_mod, "all_records", lambda c, root: iter(recs))
        return curate(tmp_path, out, cfg.model_copy(update={"incremental": False}), decode=decode)

    # once: the worker dies the first time only (an OOM kill); Dask runs the partition again on a live worker
    local = run(tmp_path / "local", {6: "once"})
    remote = run(tmp_path / "dask", {6: "once"}, decoder(client, PART))
    assert (marks / "r006.seen").exists() and "killed Dask workers" not in caplog.text  # retried by Dask itself
    assert local == remote and (local["kept"], local["quarantined"]) == (14, 0)
    _same_store(tmp_path / "local", tmp_path / "dask")
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker

    # kill: every time; after 2 dead workers the partition is decoded here, record by record, as the local pool does
    local = run(tmp_path / "local", {9: "kill"})
    remote = run(tmp_path / "dask", {9: "kill"}, decoder(client, PART))
    assert "partition 2 (4 records, faults:r008 .. faults:r011) killed Dask workers" in caplog.text
    assert local == remote and (local["kept"], local["quarantined"]) == (13, 1)
    [entry] = read_manifest(tmp_path / "dask" / "quarantine.jsonl")
    assert entry["key"] == "r009" and entry["reason"].startswith("decoder crash: worker killed by signal 9")
    _same_store(tmp_path / "local", tmp_path / "dask")
    client.wait_for_workers(2, timeout=60)


def _fail_on_r005():
    from mmkd.data import workers

    real = workers.process

    def process(rec, started=None):
        if rec.key == "r005":
            raise RuntimeError("worker-side failure outside the record's own checks")
        return real(rec, started)

    process.real = real
    workers.process = process


def _restore():
    from mmkd.data import workers

    workers.process = getattr(workers.process, "real", workers.process)


def test_a_failing_partition_fails_the_run_naming_it_and_keeps_the_previous_store(client, tmp_path, crashy,
                                                                                   monkeypatch):
    cfg = CurateCfg(workers=0, decoded_sizes=[16], min_side=16, durable=False)
    recs = [crash_reader.record(i, None, tmp_path) for i in range(10)]
    monkeypatch.setattr(curate_mod, "all_records", lambda c, root: iter(recs))
    curate(tmp_path, tmp_path / "out", cfg)
    before = _tree(tmp_path / "out")
    client.run(_fail_on_r005)
    try:
        with pytest.raises(CurationError, match=r"partition 1 \(4 records, faults:r004 \.\. faults:r007\) failed: "
                                                r"RuntimeError: worker-side failure"):
            curate(tmp_path, tmp_path / "out", cfg.model_copy(update={"incremental": False}),
                   decode=decoder(client, PART))
    finally:
        client.run(_restore)
    assert _tree(tmp_path / "out") == before  # the live store is the last run's, whole


def test_the_curate_step_task_with_executor_dask_writes_the_local_store(workspace, prefect_harness, monkeypatch):
    """The pipeline's path: params.yaml's curate.executor: dask, the Prefect step task, a local cluster of
    features.dask.n_workers processes started by the step; the store equals the local executor's."""
    from prefect import flow

    from mmkd.steps import Context, run_step
    from tasks.curate import curate as curate_task

    run_step("synth", Context.load(workspace))
    run_step("curate", Context.load(workspace))
    curated = workspace / "artifacts" / "curated"
    shutil.copytree(curated, tmp := workspace / "local-store")
    shutil.rmtree(curated)
    params = workspace / "params.yaml"
    text = params.read_text()
    switched = text.replace("  executor: local               # local | dask: decoding",
                            "  executor: dask                # local | dask: decoding", 1)
    switched = switched.replace("  partition_records: 256", "  partition_records: 16", 1)
    assert switched.count("executor: dask") == 1 and "partition_records: 16" in switched
    params.write_text(switched)
    assert Context.load(workspace).params.curate.executor == "dask"

    used = []  # the step must decode on the cluster, not fall back to the local pool
    monkeypatch.setattr(curate_dask, "decoder", lambda client, *a: used.append((len(client.nthreads()), *a))
                        or decoder(client, *a))

    @flow(name="curate-on-dask")
    def one() -> dict:
        return curate_task(str(workspace), str(params), "smoke", None, force=True)

    out = one()
    assert used == [(2, 16, 2)]  # features.dask.n_workers workers, curate.partition_records, curate.workers
    assert out["summary"]["kept"] > 0 and (curated / "contamination.json").exists()
    # contamination.json is the step's report beside the store (not in checksums.json), with the second run's
    # embedding-cache hits in it; every file of the store itself is compared
    _same_store(tmp, curated, skip=("contamination.json",))
