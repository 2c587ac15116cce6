"""Model tests: losses, checkpoints, the teacher registry's loading families, projector and teacher sampling."""

import math

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mmkd.config import AlignCfg
from mmkd.features.projector import load_projector, save_projector, train_projector
from mmkd.models.factory import create_model, load_checkpoint, save_checkpoint
from mmkd.training.distill import routing
from mmkd.training.losses import clip_loss, distillation_loss, feature_distillation, interactive_contrastive
from mmkd.training.supervision import TeacherSampler

CPU = torch.device("cpu")


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_loss_prefers_aligned_pairs():
    a = unit(16, 32)
    scale = torch.tensor(1 / 0.07)
    assert clip_loss(a, a, scale) < clip_loss(a, unit(16, 32, seed=1), scale)
    assert clip_loss(a, a, scale).item() < 0.05


def test_distillation_terms():
    s_i, s_t = unit(8, 16), unit(8, 16, seed=1)
    assert feature_distillation(s_i, s_t, s_i, s_t).item() == 0.0
    scale = torch.tensor(1 / 0.07)
    assert interactive_contrastive(s_i, s_i, s_i, s_i, scale) < interactive_contrastive(s_i, s_i, unit(8, 16, seed=2), unit(8, 16, seed=3), scale)
    total, parts = distillation_loss(s_i, s_t, s_i, s_t, scale, scale, 50.0, 1.0)
    assert math.isclose(total.item(), parts["loss_task"] + parts["loss_icl"], rel_tol=1e-5)


def test_checkpoint_roundtrip_is_safetensors(tmp_path):
    torch.manual_seed(0)
    m = create_model("mmkd-teacher-vit-t")
    save_checkpoint(m, tmp_path / "ck", "mmkd-teacher-vit-t")
    assert (tmp_path / "ck" / "model.safetensors").exists()
    m2, meta = load_checkpoint(tmp_path / "ck")
    tok = open_clip.get_tokenizer("mmkd-teacher-vit-t")(["a fundus photograph"])
    assert torch.allclose(m.eval().encode_text(tok), m2.encode_text(tok))
    assert meta["model"] == "mmkd-teacher-vit-t"


def test_projector_maps_each_teacher_to_unit_student_vectors(tmp_path):
    feats = {"a": unit(200, 24), "b": unit(150, 40, seed=5)}
    model, metrics = train_projector(feats, latent=16, cfg=AlignCfg(hidden=32, epochs=3, batch_size=64), seed=0)
    assert set(metrics) == {"recon_mse_a", "recon_mse_b"}
    out = model.project("b", feats["b"])
    assert out.shape == (150, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(150), atol=1e-5)
    save_projector(model, tmp_path)
    again = load_projector(tmp_path)
    assert torch.allclose(again.project("a", feats["a"]), model.project("a", feats["a"]), atol=1e-6)


def test_projector_training_reduces_reconstruction_error():
    feats = {"a": unit(400, 24)}
    _, short = train_projector(feats, 16, AlignCfg(hidden=64, epochs=1, dropout=0.0), seed=0)
    _, long = train_projector(feats, 16, AlignCfg(hidden=64, epochs=40, dropout=0.0), seed=0)
    assert long["recon_mse_a"] < short["recon_mse_a"]


def test_routing_and_sampler_draw_only_eligible_teachers():
    domains = {"rad": ["xray"], "path": ["pathology"], "gen": ["xray", "pathology", "oct"]}
    mods = ["xray", "pathology", "oct", "xray"]
    mask = routing(domains, mods, route_by_modality=True)
    assert mask.tolist() == [[True, False, True], [False, True, True], [False, False, True], [True, False, True]]
    assert routing(domains, mods, route_by_modality=False).all()
    sampler = TeacherSampler(mask, seed=0)
    draws = torch.stack([sampler.draw(torch.arange(4)) for _ in range(300)])
    for i in range(4):
        assert set(draws[:, i].tolist()) == set(np.flatnonzero(mask[i]).tolist())
    again = TeacherSampler(mask, seed=0)
    assert torch.equal(torch.stack([again.draw(torch.arange(4)) for _ in range(300)]), draws)


def test_training_is_repeatable_for_a_seed(tmp_path):
    """Same seed, same data, same threads: bit-identical weights (the determinism params.yaml promises on CPU)."""
    from safetensors.torch import load_file

    from mmkd.config import TrainCfg
    from mmkd.training.clip import train_clip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 48, 48, 3), dtype=np.uint8)
    captions = [f"a chest X-ray number {i}" for i in range(24)]
    cfg = TrainCfg(epochs=2, batch_size=8, warmup_steps=1)
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        train_clip("mmkd-teacher-vit-t", images, captions, cfg, seed, CPU, tmp_path / run, run)
    a, b, c = (load_file(tmp_path / r / "model.safetensors") for r in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_student_starts_from_a_natural_image_clip_image_tower(tmp_path):
    """pretrain.init: the image tower comes from the checkpoint, the text tower keeps its own weights."""
    import torch
    from safetensors.torch import save_file

    from mmkd.models.factory import create_model
    import pytest

    from mmkd.models.init import InitError, init_from_clip

    torch.manual_seed(1)
    natural = create_model("mmkd-student-tiny")  # stands in for MetaCLIP: same image tower, its own text tower
    nested = {"epoch": 32, "state_dict": {f"module.{k}": v for k, v in natural.state_dict().items()}}
    torch.save(nested, tmp_path / "epoch_32.pt")
    torch.manual_seed(2)
    student = create_model("mmkd-student-tiny")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    info = init_from_clip(student, tmp_path / "epoch_32.pt")
    after = student.state_dict()
    assert info["loaded"] == sum(1 for k in after if k.startswith("visual.")) and info["missing"] == 0
    assert all(torch.equal(after[k], natural.state_dict()[k]) for k in after if k.startswith("visual."))
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("visual."))
    # a hub-layout folder works too
    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in natural.state_dict().items()}, tmp_path / "hub" / "open_clip_model.safetensors")
    assert init_from_clip(create_model("mmkd-student-tiny"), tmp_path / "hub")["loaded"] == info["loaded"]
    with pytest.raises(InitError, match="no weights under"):
        init_from_clip(student, tmp_path / "hub", towers=("vision_model",))
    with pytest.raises(InitError, match="does not exist"):
        init_from_clip(student, tmp_path / "nowhere.pt")


def test_the_trimmed_text_tower_gives_the_full_towers_features_and_gradients():
    """Positions after the batch's last end-of-text token reach no output (causal mask, argmax pooling): cutting
    them changes neither the text features nor any parameter's gradient, beyond float rounding."""
    import copy
    import types

    from open_clip.model import CLIP

    torch.manual_seed(0)
    trimmed = create_model("mmkd-teacher-vit-s")
    full = copy.deepcopy(trimmed)
    full.encode_text = types.MethodType(CLIP.encode_text, full)  # open_clip's own: all 32 positions
    assert trimmed.encode_text.__func__ is not CLIP.encode_text
    tok = open_clip.get_tokenizer("mmkd-teacher-vit-s")
    text = tok(["Chest X-ray.", "CXR showing small left consolidation at the base of the lung, stable."])
    assert int(text.argmax(-1).max()) + 1 < text.shape[1]  # there is something to cut
    images = torch.randn(2, 3, 48, 48)
    losses = []
    for model in (trimmed, full):
        img, txt, scale = model(images, text)[:3]
        loss = (scale * img @ txt.T).logsumexp(-1).sum()
        loss.backward()
        losses.append((txt.detach(), loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (t1, l1, g1), (t2, l2, g2) = losses
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)
    assert math.isclose(l1, l2, rel_tol=1e-6)
    for k in g1:
        scale = float(g2[k].abs().max())  # rounding is relative to the largest entry of a summed gradient
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6 * max(1.0, scale), msg=k)
    # a deep copy (DDP, EMA) keeps the trimmed tower bound to the copy itself
    twin = copy.deepcopy(trimmed)
    assert twin.encode_text.__self__ is twin
