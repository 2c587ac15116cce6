"""Model tests: the feature cache and stage-2 distillation on the curated smoke corpus, with small trained twins."""

import json

import numpy as np
import open_clip
import pytest
import torch

from mmkd.config import DistillCfg, ProjectorCfg, TeacherSpec, TrainCfg
from mmkd.data.store import split_records
from mmkd.features.cache import FeatureCacheError, build_cache, load_split
from mmkd.models.encoder import ClipEncoder
from mmkd.models.factory import create_model, save_checkpoint
from mmkd.training.distill import distill

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cached(smoke_corpus, tmp_path_factory):
    """Two untrained teachers of different widths and domains, cached over the smoke corpus."""
    out = tmp_path_factory.mktemp("features")
    teachers = []
    for name, model, mods in (("rad", "mmkd-teacher-vit-t", ["xray", "ct", "mri", "ultrasound"]),
                              ("path", "mmkd-teacher-rn", ["pathology"])):
        torch.manual_seed(0)
        teachers.append((TeacherSpec(name=name, model=model, modalities=mods),
                         ClipEncoder(name, create_model(model), open_clip.get_tokenizer(model), CPU)))
    stats = build_cache(smoke_corpus / "artifacts" / "curated", out, teachers, latent_dim=128,
                        projector_cfg=ProjectorCfg(hidden=32, epochs=2), seed=0, batch_size=64)
    return smoke_corpus, out, stats


def test_cache_rows_follow_the_curated_ids(cached):
    root, features, stats = cached
    records = split_records(root / "artifacts" / "curated", "train")
    ids = [r["id"] for r in records]
    feats = load_split(features, "train", ids)
    assert feats["rad"]["image"].shape == (len(ids), 160) and feats["path"]["text"].shape == (len(ids), 96)
    for t in ("rad", "path"):
        assert torch.allclose(feats[t]["image_proj"].norm(dim=1), torch.ones(len(ids)), atol=1e-5)
    assert stats["teachers"] == 2 and "recon_mse_rad" in stats
    with pytest.raises(FeatureCacheError, match="differ from the curated manifest"):
        load_split(features, "train", list(reversed(ids)))


def test_distill_routes_teachers_by_domain_and_saves_a_student(cached, tmp_path):
    root, features, _ = cached
    curated = root / "artifacts" / "curated"
    torch.manual_seed(0)
    save_checkpoint(create_model("mmkd-student-tiny"), tmp_path / "stage1", "mmkd-student-tiny")
    cfg = DistillCfg(train=TrainCfg(epochs=1, batch_size=32, warmup_steps=1))
    hist = distill(tmp_path / "stage1", curated, features, cfg, 0, CPU, tmp_path / "student")
    records = split_records(curated, "train")
    mods = [r["modality"] for r in records]
    # only pathology samples may draw `path`; radiology samples draw `rad`; the rest (no teacher) draw either
    n_path, n_rad = mods.count("pathology"), sum(m in ("xray", "ct", "mri", "ultrasound") for m in mods)
    n_orphan = len(mods) - n_path - n_rad
    assert hist["orphan_samples"] == n_orphan
    routed = (n_path + 0.5 * n_orphan) / len(mods)  # expected share of `path` draws with routing; 0.5 without
    assert abs(hist["teacher_share_path"] - routed) < 0.1, (hist["teacher_share_path"], routed)
    assert (tmp_path / "student" / "model.safetensors").exists()
    meta = json.loads((tmp_path / "student" / "model.json").read_text())
    assert meta["teachers"] == ["rad", "path"] and meta["stage"] == 2
    assert np.isfinite(hist["loss"]) and hist["loss_fd"] > 0
