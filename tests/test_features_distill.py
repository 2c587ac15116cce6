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
          AlignCfg(hidden=32, epochs=2), 0, "float32")
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
    assert meta["teachers"] == ["rad", "path"] and meta["stage"] == 2
    assert np.isfinite(hist["loss"]) and hist["loss_fd"] > 0


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
