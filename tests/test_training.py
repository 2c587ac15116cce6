"""Model tests of the training loop: optimiser groups, augmentation, accumulation, resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmkd.config import TrainCfg
from mmkd.models.factory import create_model
from mmkd.models.preprocess import ImageSpec
from mmkd.training.augment import apply_crops, crop_area_fraction, draw_crops
from mmkd.training.loop import param_groups, warmup_cosine
from mmkd.training.objective import Objective

HERE = Path(__file__).parent
SCRIPT = HERE / "train_script.py"
BASE = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "grad_clip_norm": 1.0}


def run_script(out: Path, cfg: dict, sleep: float = 0.0, nproc: int = 1, wait: bool = True):
    args = [str(out), json.dumps(cfg), str(sleep)]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
           if nproc > 1 else [sys.executable, str(SCRIPT)]) + args
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return load_file(out / "model" / "model.safetensors")


def test_param_groups_follow_the_clip_recipe():
    model = create_model("mmkd-student-tiny")
    decay, no_decay = param_groups([model], 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in kept and not any("bias" in n or "ln_" in n for n in decayed)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "visual.conv1.weight" in decayed and "token_embedding.weight" in decayed
    assert len(decayed) + len(kept) == sum(1 for _ in model.parameters())


def test_warmup_then_cosine():
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


def test_crops_redraw_instead_of_clamping():
    boxes = draw_crops(20000, torch.Generator().manual_seed(0))
    area = crop_area_fraction(boxes)
    aspect = (boxes[:, 0] / boxes[:, 1]).numpy()
    assert area.min() >= 0.9 - 1e-6 and area.max() <= 1.0 + 1e-6
    full = (boxes[:, 0] == 1) & (boxes[:, 1] == 1)
    # on a square image few (area, aspect) draws fit; after 10 tries torchvision falls back to the whole
    # image, as here: that happens for ~13% of crops with scale (0.9, 1) and ratio (3/4, 4/3)
    assert 0.08 < float(full.float().mean()) < 0.2
    ok = ~full.numpy()
    assert aspect[ok].min() >= 0.75 - 1e-6 and aspect[ok].max() <= 4 / 3 + 1e-6
    assert (boxes[:, 0] <= 1).all() and (boxes[:, 1] <= 1).all()
    assert ((boxes[:, 2].abs() <= 1 - boxes[:, 0] + 1e-6) & (boxes[:, 3].abs() <= 1 - boxes[:, 1] + 1e-6)).all()


def test_training_resamples_as_evaluation_does():
    """A whole-image crop gives what evaluation's bicubic resize gives (same interpolation, same clamp)."""
    x = torch.rand(3, 3, 64, 64)
    spec = ImageSpec(size=48)
    whole = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)
    train_view = apply_crops(x, whole, spec)
    eval_view = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose(train_view, eval_view, atol=2e-5)


class _Contrastive(Objective):
    """InfoNCE over the gathered batch: the plumbing of the loop with a known loss."""

    def loss(self, img, txt, logit_scale, idx):
        from mmkd.training.distributed import gather_batch
        from mmkd.training.losses import clip_loss

        return clip_loss(gather_batch(img), gather_batch(txt), logit_scale), {}



def test_accumulation_matches_one_pass(tmp_path):
    """Two micro-batches with the gradient cache give the one-pass gradient: same weights after training."""
    sys.path.insert(0, str(HERE))
    from train_script import tiny_pairs

    from mmkd.training.loop import tokenize_all, train
    import open_clip

    from mmkd.models.factory import register_configs

    register_configs()  # the tokenizer of an mmkd config (context 32) needs the config registered
    images, captions = tiny_pairs(32)
    tokens = tokenize_all(open_clip.get_tokenizer("mmkd-student-tiny"), captions)
    weights = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = create_model("mmkd-student-tiny")
        cfg = TrainCfg(epochs=1, batch_size=16, lr=1e-3, warmup_steps=1, accum_steps=accum, augment=True)
        train(model, images, tokens, cfg, _Contrastive(), 3, torch.device("cpu"), "accum")
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        # float rounding, amplified by Adam where gradients are tiny, reaches ~2e-5 (measured: 1.9e-5 with the full text
        # context, 2.3e-5 with it cut at the batch's last end-of-text token); a wrong gradient moves weights by ~lr=1e-3
        assert torch.allclose(weights[0][k], weights[1][k], atol=5e-5), k


def test_sigkill_and_resume_gives_identical_weights(tmp_path):
    cfg = {**BASE, "epochs": 3, "checkpoint_every": 3}
    reference = run_script(tmp_path / "whole", cfg)
    killed = tmp_path / "killed"
    proc = run_script(killed, cfg, sleep=0.15, wait=False)
    state = killed / "state" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    step_at_kill = torch.load(state, weights_only=True)["step"]
    assert 0 < step_at_kill < 12
    resumed = run_script(killed, cfg)
    history = json.loads((killed / "history.json").read_text())
    assert history["resumed_from_step"] == step_at_kill and history["steps"] == 12
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k


def test_a_finished_or_foreign_state_is_not_resumed(tmp_path):
    sys.path.insert(0, str(HERE))
    from train_script import main

    threads = torch.get_num_threads()
    cfg = {**BASE, "epochs": 1}
    try:
        main(str(tmp_path), json.dumps(cfg))
        assert torch.load(tmp_path / "state" / "state.pt", weights_only=True)["complete"]
        main(str(tmp_path), json.dumps(cfg))  # finished: trains afresh, not "resumed" at its end
        assert "resumed_from_step" not in json.loads((tmp_path / "history.json").read_text())
        state = torch.load(tmp_path / "state" / "state.pt", weights_only=True)
        state["complete"], state["step"] = False, 2
        torch.save(state, tmp_path / "state" / "state.pt")
        main(str(tmp_path), json.dumps({**cfg, "lr": 5e-4}))  # another config's state: not resumed either
        assert "resumed_from_step" not in json.loads((tmp_path / "history.json").read_text())
    finally:
        torch.set_num_threads(threads)


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes on gloo: same global batch, same weights as a single process."""
    cfg = {**BASE, "epochs": 1}
    single = run_script(tmp_path / "one", cfg)
    double = run_script(tmp_path / "two", cfg, nproc=2)
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert history["world_size"] == 2 and history["global_batch"] == 16
    worst = max(float((single[k] - double[k]).abs().max()) for k in single)
    assert worst < 1e-4, worst
    assert math.isfinite(history["loss"])


def test_stage1_objective_takes_the_single_process_gradients(monkeypatch):
    """Simulated 2 ranks: feature and logit-scale gradients, after x world size and DDP's average, equal one
    process's (the logit scale is applied to the whole gathered batch on every rank: its gradient is divided)."""
    from mmkd.training import distributed, objective

    gen = torch.Generator().manual_seed(0)
    s_img = F.normalize(torch.randn(4, 3, generator=gen), dim=-1)
    s_txt = F.normalize(torch.randn(4, 3, generator=gen), dim=-1)

    def grads(world, rank):
        img = s_img[rank * 4 // world:(rank + 1) * 4 // world].clone().requires_grad_(True)
        txt = s_txt[rank * 4 // world:(rank + 1) * 4 // world].clone().requires_grad_(True)
        logit = torch.tensor(2.5, requires_grad=True)

        def gather(t):
            parts = list((s_img if t is img else s_txt).detach().chunk(world))
            parts[rank] = t
            return torch.cat(parts)

        monkeypatch.setattr(objective, "gather_batch", gather)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        loss, _ = objective.ClipObjective().loss(img, txt, logit.exp(), torch.arange(4))
        (loss * world).backward()
        return img.grad, txt.grad, logit.grad

    one, r0, r1 = grads(1, 0), grads(2, 0), grads(2, 1)
    assert torch.allclose(torch.cat([r0[0], r1[0]]) / 2, one[0], atol=1e-6)
    assert torch.allclose(torch.cat([r0[1], r1[1]]) / 2, one[1], atol=1e-6)
    assert torch.allclose((r0[2] + r1[2]) / 2, one[2], atol=1e-6)


def test_the_step_entry_point_runs_under_torchrun(smoke_corpus, tmp_path):
    """`torchrun -m mmkd.cli stage pretrain`: two ranks train, rank 0 alone writes the model and the MLflow run."""
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(smoke_corpus, root, ignore=shutil.ignore_patterns("mlflow_server", "artifacts"))
    shutil.copytree(smoke_corpus / "artifacts" / "curated", root / "artifacts" / "curated")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmkd.cli",
           "stage", "pretrain", "--root", str(root)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    history = json.loads((root / "artifacts" / "student_stage1" / "model.json").read_text())
    assert history["model"] == "mmkd-student-tiny"
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow_server' / 'mlflow.db'}"
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("mmkd").experiment_id])
    assert [r.data.tags["mmkd.step"] for r in runs] == ["pretrain"]
    assert runs[0].data.metrics["final_world_size"] == 2
