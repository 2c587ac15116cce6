"""Model tests: stage-2 distillation reads teacher targets from the aligned feature store, routed by domain."""

import json

import numpy as np
import pytest
import torch

from mmkd.config import AlignCfg, DistillCfg, FeaturesCfg, TeacherSpec, TrainCfg
from mmkd.data.store import split_records
from mmkd.features.align import align
from mmkd.features.cache import cache_corpus
from mmkd.features.store import FeatureError
from mmkd.models.factory import create_model, save_checkpoint
from mmkd.teachers.registry import load_teacher
from mmkd.training.distill import distill

CPU = torch.device("cpu")
DOMAINS = {"rad": ["xray", "ct", "mri", "ultrasound"], "path": ["pathology"]}


@pytest.fixture(scope="module")
def aligned(smoke_corpus, tmp_path_factory):
    """Two untrained teachers of different widths and domains, cached and aligned over the smoke corpus."""
    out = tmp_path_factory.mktemp("features")
    curated = smoke_corpus / "artifacts" / "curated"
    pairs = []
    for name, model in (("rad", "mmkd-teacher-vit-t"), ("path", "mmkd-teacher-rn")):
        torch.manual_seed(0)
        save_checkpoint(create_model(model), out / "teachers" / name, model)
        spec = TeacherSpec(name=name, model=model, modalities=DOMAINS[name])
        pairs.append((spec, load_teacher(spec, out / "teachers", CPU)))
    cache_corpus(curated, out / "raw", pairs, FeaturesCfg(batch_size=64), show_progress=False)
    keys = np.array([r["key"] for r in split_records(curated, "train")], dtype="S32")
    align(out / "raw", [(s.name, e.version) for s, e in pairs], keys, out / "aligned", 128,
          AlignCfg(method="autoencoder", hidden=32, epochs=2), 0, "float32")
    return smoke_corpus, out


def test_distill_routes_teachers_by_domain_and_saves_a_student(aligned, tmp_path):
    root, features = aligned
    curated = root / "artifacts" / "curated"
    torch.manual_seed(0)
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    hist = distill(tmp_path / "stage1", curated, features / "aligned", DOMAINS, cfg, 0, CPU, tmp_path / "student")
    records = split_records(curated, "train")
    mods = [r["modality"] for r in records]
    # only pathology samples may draw `path`; radiology samples draw `rad`; the rest (no teacher) draw either
    n_path, n_rad = mods.count("pathology"), sum(m in DOMAINS["rad"] for m in mods)
    n_orphan = len(mods) - n_path - n_rad
    assert hist["orphan_samples"] == n_orphan
    routed = (n_path + 0.5 * n_orphan) / len(mods)  # expected share of `path` draws with routing; 0.5 without
    assert abs(hist["teacher_share_path"] - routed) < 0.1, (hist["teacher_share_path"], routed)
    assert (tmp_path / "student" / "model.safetensors").exists()
    meta = json.loads((tmp_path / "student" / "model.json").read_text())
    assert meta["teachers"] == ["rad", "path"] and meta["stage"] == 2 and meta["strategy"] == "reference"
    assert np.isfinite(hist["loss"]) and hist["loss_fd"] > 0
    # the ICL temperature learns at its own lr, stays in its bounds, and model.json holds the value the loss used
    assert meta["icl_temperature"] == pytest.approx(hist["icl_temperature"])
    assert 0.01 <= meta["icl_temperature"] <= 1.0 and meta["icl_temperature"] != pytest.approx(0.07, abs=1e-4)
    weights = json.loads((tmp_path / "student" / "teacher_weights.json").read_text())
    assert weights["strategy"] == "reference" and weights["teacher_share"]["path"] == pytest.approx(
        hist["teacher_share_path"])


@pytest.mark.parametrize("strategy", ["mean", "routed", "relational"])
def test_distill_strategies_train_from_the_stores(aligned, tmp_path, strategy):
    root, features = aligned
    curated = root / "artifacts" / "curated"
    torch.manual_seed(0)
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(strategy=strategy, train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    # relational reads the raw store only: no aligned store needed
    aligned_dir = features / "aligned" if strategy != "relational" else tmp_path / "no-aligned-store"
    hist = distill(tmp_path / "stage1", curated, aligned_dir, DOMAINS, cfg, 0, CPU, tmp_path / "student",
                   teacher_dir=features / "raw")
    assert np.isfinite(hist["loss"]) and sum(hist[f"teacher_share_{t}"] for t in DOMAINS) == pytest.approx(1)
    weights = json.loads((tmp_path / "student" / "teacher_weights.json").read_text())
    assert weights["strategy"] == strategy
    if strategy == "relational":
        assert hist["loss_relational"] > 0 and "icl_temperature" not in hist
    else:
        assert hist["loss_fd"] > 0 and hist["loss_icl"] > 0
    if strategy == "routed":
        # routed by declared domain: `path` never speaks on radiology, `rad` never on pathology
        assert weights["weights"]["pathology"]["rad"] == 0 and weights["weights"]["xray"]["path"] == 0
        assert weights["weights"]["pathology"]["path"] == 1 and hist["route_weight.xray.rad"] == 1
        assert set(weights["quality"]) >= {"xray", "pathology"}


def test_routed_with_image_structure_and_modality_focus_from_the_stores(aligned, tmp_path):
    """The stage-1 student's own probe quality is measured on the probe split (as the teachers' is) and turns into
    per-modality weights with mean 1 over the train samples; the image-structure term is trained."""
    root, features = aligned
    curated = root / "artifacts" / "curated"
    torch.manual_seed(0)
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(strategy="routed", structure_weight=1.0, modality_focus=3.0,
                     train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    (tmp_path / ".focus-killed" / "x").mkdir(parents=True)  # the scratch of a run killed before it cleaned up
    hist = distill(tmp_path / "stage1", curated, features / "aligned", DOMAINS, cfg, 0, CPU, tmp_path / "student",
                   teacher_dir=features / "raw")
    assert hist["loss_structure"] > 0
    weights = json.loads((tmp_path / "student" / "teacher_weights.json").read_text())
    assert weights["modality_focus"] == 3.0
    probe = split_records(curated, "probe")
    assert set(weights["student_quality"]) == set(weights["focus"]) >= {r["modality"] for r in probe}
    assert all(q is None or 0 <= q <= 1 for q in weights["student_quality"].values())
    mods = [r["modality"] for r in split_records(curated, "train")]
    mean = sum(weights["focus"][m] for m in mods) / len(mods)
    assert mean == pytest.approx(1.0) and min(weights["focus"].values()) > 0
    assert hist[f"focus.{mods[0]}"] == pytest.approx(weights["focus"][mods[0]])
    assert not list(tmp_path.glob(".focus-*"))  # the student's probe embeddings were scratch; a stale one is gone


def test_sampling_focus_draws_the_lagging_modalities_more_often(aligned, tmp_path):
    """The stage-1 student's and each declared teacher's linear-probe accuracy on the train split's labelled images
    give each modality's lag; its sampling factor has mean 1 over the train rows and is reported."""
    root, features = aligned
    curated = root / "artifacts" / "curated"
    torch.manual_seed(0)
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(strategy="reference", sampling_focus=4.0, train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    hist = distill(tmp_path / "stage1", curated, features / "aligned", DOMAINS, cfg, 0, CPU, tmp_path / "student",
                   teacher_dir=features / "raw")
    weights = json.loads((tmp_path / "student" / "teacher_weights.json").read_text())
    assert weights["sampling_focus"] == 4.0
    mods = [r["modality"] for r in split_records(curated, "train")]
    assert sum(weights["sampling"][m] for m in mods) / len(mods) == pytest.approx(1.0)
    lag, probe = weights["sampling_lag"], weights["sampling_probe"]
    for m in set(mods):
        declared = [probe[t][m] for t in DOMAINS if m in DOMAINS[t] and probe[t][m] is not None]
        best = max(declared, default=None)
        expected = 0.0 if best is None or probe["student_stage1"][m] is None else max(0.0, best -
                                                                                       probe["student_stage1"][m])
        assert lag[m] == pytest.approx(expected)
        assert hist[f"sampling.{m}"] == pytest.approx(weights["sampling"][m])
    assert probe["path"]["xray"] is None  # path is not declared for xray: not measured there
    # the more a modality lags, the more often it is drawn
    order = sorted(set(mods), key=lambda m: lag[m])
    assert [weights["sampling"][m] for m in order] == sorted(weights["sampling"][m] for m in order)


def test_sampling_focus_under_torchrun_gives_every_rank_one_order(aligned, tmp_path):
    """Two gloo ranks draw the weighted epoch from rank 0's factors: the same global batches, so the weights equal
    one process's (each rank measures the lag itself; a difference in one prediction would split the order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root, features = aligned
    torch.manual_seed(0)
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    script = Path(__file__).parent / "distill_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "stage1"), str(root / "artifacts" / "curated"), str(features)]
    for n in (1, 2):
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                                     if n > 1 else [])
        done = subprocess.run(launch + [str(script), *args, str(tmp_path / f"p{n}")], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"p{n}" / "history.json").read_text()) for n in (1, 2))
    assert two["world_size"] == 2 and one["global_batch"] == two["global_batch"]
    assert {k: v for k, v in one.items() if k.startswith("sampling.")} == \
        {k: v for k, v in two.items() if k.startswith("sampling.")} != {}
    a, b = (load_file(tmp_path / f"p{n}" / "model.safetensors") for n in (1, 2))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst


def test_routed_and_relational_need_the_raw_store(aligned, tmp_path):
    root, features = aligned
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(strategy="routed", train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    with pytest.raises(FeatureError, match="reads the raw teacher feature store"):
        distill(tmp_path / "stage1", root / "artifacts" / "curated", features / "aligned", DOMAINS, cfg, 0, CPU,
                tmp_path / "student")


def test_distill_refuses_missing_teachers_and_wrong_dims(aligned, tmp_path):
    root, features = aligned
    curated = root / "artifacts" / "curated"
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    with pytest.raises(FeatureError, match=r"no aligned features of teachers \['derm'\]; run align"):
        distill(tmp_path / "stage1", curated, features / "aligned", {**DOMAINS, "derm": ["dermatology"]}, cfg, 0, CPU,
                tmp_path / "student")
    save_checkpoint(create_model("mmkd-teacher-vit-t"), tmp_path / "other", "mmkd-teacher-vit-t")
    with pytest.raises(FeatureError, match="!= student embed_dim 160; re-run align"):
        distill(tmp_path / "other", curated, features / "aligned", DOMAINS, cfg, 0, CPU, tmp_path / "student")
