"""Unit tests of the stage-2 strategies and their losses on tiny hand-made tensors (no model, no store)."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from mmkd.config import DistillCfg, TrainCfg
from mmkd.training import distributed, strategies
from mmkd.training.losses import (
    clip_loss,
    fd_per_sample,
    feature_distillation,
    interactive_contrastive,
    masked_interactive_contrastive,
    relational_distillation,
)
from mmkd.training.quality import routed_weights, teacher_quality
from mmkd.training.strategies import (
    STRATEGIES,
    MeanObjective,
    ReferenceObjective,
    RelationalObjective,
    RoutedObjective,
)
from mmkd.training.supervision import Supervision


class Arrays:
    """In-memory stand-in for features.store.TeacherFeatures: per teacher [N, d_t] image/text, [N, T] availability."""

    def __init__(self, names, img, txt, available):
        self.names, self.img, self.txt = list(names), img, txt
        self.available = np.asarray(available, dtype=bool)

    def batch(self, idx):
        idx = np.asarray(idx)
        return {t: (self.img[j][idx] * self.available[idx, j, None], self.txt[j][idx] * self.available[idx, j, None])
                for j, t in enumerate(self.names)}

    def stacked(self, idx):
        parts = self.batch(idx)
        return (np.stack([parts[t][0] for t in self.names], 1), np.stack([parts[t][1] for t in self.names], 1),
                self.available[np.asarray(idx)])

    def chosen(self, idx, choice):
        return (np.stack([self.img[c][i] for i, c in zip(idx, choice)]),
                np.stack([self.txt[c][i] for i, c in zip(idx, choice)]))


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=-1).float()


def cfg(**kw):
    return DistillCfg(train=TrainCfg(epochs=1, batch_size=4, warmup_steps=0), **kw)


# ------------------------------------------------------------------ independent numpy references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def np_clip(img, txt, s):
    lg = s * img @ txt.T
    return 0.5 * np.mean([-np_log_softmax(lg[i])[i] - np_log_softmax(lg[:, i])[i] for i in range(len(img))])


def np_icl_terms(s_img, s_txt, t_img, t_txt, rows, scale):
    """{i: ICL term of sample i} for one teacher restricted to the sample set `rows`."""
    rows = list(rows)
    out = {}
    for k, i in enumerate(rows):
        i2t = -np_log_softmax([scale * s_img[i] @ t_txt[j] for j in rows])[k]
        t2i = -np_log_softmax([scale * s_txt[i] @ t_img[j] for j in rows])[k]
        out[i] = 0.5 * (i2t + t2i)
    return out


def np_soft_ce(p_logits, q_logits):
    p = np.exp(np_log_softmax(p_logits))
    return -(p * np_log_softmax(q_logits)).sum()


# ------------------------------------------------------------------ FD scale


def test_fd_means_the_reference_at_any_student_dim():
    s_i, s_t, t_i, t_t = (unit(5, 512, seed=k) for k in range(4))
    reference = F.mse_loss(s_i, t_i) + F.mse_loss(s_t, t_t)  # the reference recipe's FD at its 512-d student
    assert torch.allclose(feature_distillation(s_i, s_t, t_i, t_t), reference, rtol=1e-6)
    s_i, s_t, t_i, t_t = (unit(5, 128, seed=k) for k in range(4))
    ours = feature_distillation(s_i, s_t, t_i, t_t)
    # at 128-d: squared error summed over dims / 512, i.e. mse_loss * 128 / 512 (not 4x the reference's weight)
    assert torch.allclose(ours, (F.mse_loss(s_i, t_i) + F.mse_loss(s_t, t_t)) * 128 / 512, rtol=1e-6)
    by_hand = sum(((s_i[b] - t_i[b]) ** 2).sum() + ((s_t[b] - t_t[b]) ** 2).sum() for b in range(5)) / 512 / 5
    assert math.isclose(ours.item(), by_hand.item(), rel_tol=1e-5)
    assert torch.allclose(feature_distillation(s_i, s_t, t_i, t_t, reference_dim=128),
                          F.mse_loss(s_i, t_i) + F.mse_loss(s_t, t_t), rtol=1e-6)


# ------------------------------------------------------------------ the four strategies on hand-made inputs


S_IMG = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
S_TXT = np.array([[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
T_IMG = [np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), np.array([[0.8, -0.6], [0.6, 0.8], [0.0, 1.0]])]
T_TXT = [np.array([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [0.8, 0.6], [-0.6, 0.8]])]
SCALE = 10.0


def run_loss(objective, idx=(0, 1, 2)):
    idx = torch.tensor(idx)
    objective.begin_step(idx)
    img, txt = torch.tensor(S_IMG[idx.numpy()], dtype=torch.float32), torch.tensor(S_TXT[idx.numpy()], dtype=torch.float32)
    loss, parts = objective.loss(img, txt, torch.tensor(SCALE), idx)
    return loss.item(), parts


def test_reference_loss_by_hand():
    # sample 0 and 2 can only learn from teacher 0, sample 1 only from teacher 1: the draw is forced
    avail = np.array([[1, 0], [0, 1], [1, 0]], bool)
    sup = Supervision(["a", "b"], avail, aligned=Arrays(["a", "b"], T_IMG, T_TXT, avail))
    c = cfg(icl_init_temperature=0.5, fd_weight=50.0, icl_weight=1.0)
    loss, parts = run_loss(ReferenceObjective(sup, c, seed=0))
    t_img = np.stack([T_IMG[0][0], T_IMG[1][1], T_IMG[0][2]])
    t_txt = np.stack([T_TXT[0][0], T_TXT[1][1], T_TXT[0][2]])
    task = np_clip(S_IMG, S_TXT, SCALE)
    fd = np.mean([((S_IMG[i] - t_img[i]) ** 2).sum() + ((S_TXT[i] - t_txt[i]) ** 2).sum() for i in range(3)]) / 512
    icl = np.mean(list(np_icl_terms(S_IMG, S_TXT, t_img, t_txt, range(3), 2.0).values()))
    assert math.isclose(parts["loss_task"], task, rel_tol=1e-5)
    assert math.isclose(parts["loss_fd"], fd, rel_tol=1e-5)
    assert math.isclose(parts["loss_icl"], icl, rel_tol=1e-5)
    assert math.isclose(loss, task + 50 * fd + icl, rel_tol=1e-5)
    assert math.isclose(parts["icl_temperature"], 0.5, rel_tol=1e-6)


def test_mean_loss_averages_each_samples_available_teachers():
    # teacher a has features for samples 0, 1; teacher b for 0, 2
    avail = np.array([[1, 1], [1, 0], [0, 1]], bool)
    sup = Supervision(["a", "b"], avail, aligned=Arrays(["a", "b"], T_IMG, T_TXT, avail))
    loss, parts = run_loss(MeanObjective(sup, cfg(icl_init_temperature=0.25, fd_weight=50.0, icl_weight=2.0), 0))
    w = np.array([[0.5, 0.5], [1, 0], [0, 1]])
    fd = np.mean([sum(w[i, t] * (((S_IMG[i] - T_IMG[t][i]) ** 2).sum() + ((S_TXT[i] - T_TXT[t][i]) ** 2).sum())
                      for t in range(2)) for i in range(3)]) / 512
    icl_a = np_icl_terms(S_IMG, S_TXT, T_IMG[0], T_TXT[0], [0, 1], 4.0)
    icl_b = np_icl_terms(S_IMG, S_TXT, T_IMG[1], T_TXT[1], [0, 2], 4.0)
    icl = (0.5 * icl_a[0] + 0.5 * icl_b[0] + icl_a[1] + icl_b[2]) / 3
    task = np_clip(S_IMG, S_TXT, SCALE)
    assert math.isclose(parts["loss_fd"], fd, rel_tol=1e-5)
    assert math.isclose(parts["loss_icl"], icl, rel_tol=1e-5)
    assert math.isclose(loss, task + 50 * fd + 2 * icl, rel_tol=1e-5)


def test_one_teacher_everywhere_makes_reference_mean_and_routed_agree():
    avail = np.ones((3, 1), bool)
    feats = Arrays(["a"], T_IMG[:1], T_TXT[:1], avail)
    sup = Supervision(["a"], avail, aligned=feats, modality=np.zeros(3, int), modalities=["xray"],
                      quality=np.array([[0.7]]), routed=np.ones((1, 1), bool))
    losses = [run_loss(kind(sup, cfg(), 0))[0] for kind in (ReferenceObjective, MeanObjective, RoutedObjective)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) == pytest.approx(losses[2], rel=1e-6)


def test_masked_icl_matches_plain_icl_without_missing_rows():
    s_i, s_t, t_i, t_t = (unit(6, 8, seed=k) for k in range(4))
    scale = torch.tensor(14.0)
    terms = masked_interactive_contrastive(s_i, s_t, t_i[:, None], t_t[:, None], torch.ones(6, 1, dtype=torch.bool), scale)
    assert torch.allclose(terms.mean(), interactive_contrastive(s_i, s_t, t_i, t_t, scale), rtol=1e-5)
    # a missing row leaves every other row's term a function of the present samples only, and is itself 0
    mask = torch.tensor([[True], [True], [False], [True], [True], [True]])
    masked = masked_interactive_contrastive(s_i, s_t, t_i[:, None], t_t[:, None], mask, scale)
    keep = [0, 1, 3, 4, 5]
    sub = masked_interactive_contrastive(s_i[keep], s_t[keep], t_i[keep, None], t_t[keep, None],
                                         torch.ones(5, 1, dtype=torch.bool), scale)
    assert masked[2, 0] == 0 and torch.allclose(masked[keep], sub, rtol=1e-5)
    assert torch.isfinite(masked_interactive_contrastive(s_i, s_t, t_i[:, None], t_t[:, None],
                                                         torch.zeros(6, 1, dtype=torch.bool), scale)).all()


def test_routed_loss_uses_the_quality_weights():
    # two modalities; teacher a declared for both, b for modality 1 only; b lacks sample 0
    avail = np.array([[1, 0], [1, 1], [1, 1]], bool)
    quality = np.array([[0.8, 0.6], [np.nan, 0.9]])  # [T, M]
    routed = np.array([[True, False], [True, True]])  # [M, T]
    modality = np.array([1, 0, 1])
    eligible = avail & routed[modality]
    sup = Supervision(["a", "b"], eligible, aligned=Arrays(["a", "b"], T_IMG, T_TXT, avail), modality=modality,
                      modalities=["x", "y"], quality=quality, routed=routed)
    c = cfg(routed_temperature=0.1, icl_init_temperature=0.5)
    obj = RoutedObjective(sup, c, 0)
    loss, parts = run_loss(obj)
    wb = math.exp(9) / (math.exp(6) + math.exp(9))
    w = np.array([[1, 0], [1, 0], [1 - wb, wb]])  # sample 0: b has no features; sample 1: modality x, a only
    fd = np.mean([sum(w[i, t] * (((S_IMG[i] - T_IMG[t][i]) ** 2).sum() + ((S_TXT[i] - T_TXT[t][i]) ** 2).sum())
                      for t in range(2)) for i in range(3)]) / 512
    icl_a = np_icl_terms(S_IMG, S_TXT, T_IMG[0], T_TXT[0], [0, 1, 2], 2.0)
    icl_b = np_icl_terms(S_IMG, S_TXT, T_IMG[1], T_TXT[1], [2], 2.0)
    icl = (icl_a[0] + icl_a[1] + w[2, 0] * icl_a[2] + w[2, 1] * icl_b[2]) / 3
    assert math.isclose(parts["loss_fd"], fd, rel_tol=1e-5)
    assert math.isclose(parts["loss_icl"], icl, rel_tol=1e-5)
    assert math.isclose(loss, np_clip(S_IMG, S_TXT, SCALE) + 50 * fd + icl, rel_tol=1e-5)
    summary = obj.summary()
    assert summary["route_weight.y.b"] == pytest.approx(wb) and summary["route_weight.x.b"] == 0.0
    assert summary["route_quality.y.b"] == 0.9 and "route_quality.x.b" not in summary
    assert obj.report()["weights"]["x"] == {"a": 1.0, "b": 0.0}


def test_routed_weights_favour_the_specialist_in_its_domain_only():
    # teachers [general, path]; the table is [M, T]: one row per modality
    quality = np.array([[0.8, 0.6, 0.7],     # general: xray, pathology, oct
                        [np.nan, 0.9, 0.2]])  # path: not measured on xray
    routed = np.array([[True, False], [True, True], [True, False]])  # path declared for pathology only
    w = routed_weights(quality, routed, temperature=0.05)
    assert w.shape == (3, 2) and np.allclose(w.sum(1), 1)
    assert w[1, 1] > w[1, 0]  # the pathology specialist speaks loudest on pathology
    assert w[1, 1] == pytest.approx(1 / (1 + math.exp(-0.3 / 0.05)))
    assert w[0, 1] == 0 and w[2, 1] == 0 and w[0, 0] == 1 and w[2, 0] == 1  # and not at all off its domain
    # without routing, quality alone decides; an unmeasured teacher counts as the worst measured one
    free = routed_weights(quality, np.ones((3, 2), bool), temperature=0.05)
    assert free[2, 0] > free[2, 1] and free[0, 0] == pytest.approx(0.5)


def test_teacher_quality_is_the_balanced_nearest_prototype_accuracy():
    # modality 0 has classes a, b; modality 1 is unlabelled. Teacher 0 sees all of modality 0; teacher 1 only
    # class a (one class: not measurable).
    txt0 = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], float)
    img0 = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.0, 1.0], [1, 0]], float)  # sample 1 (a) goes wrong
    txt1 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]], float)
    avail = np.array([[1, 1], [1, 1], [1, 0], [1, 0], [1, 1]], bool)
    feats = Arrays(["t0", "t1"], [img0, txt1], [txt0, txt1], avail)
    labels = ["a", "a", "b", "b", None]
    q = teacher_quality(feats, labels, np.array([0, 0, 0, 0, 1]), 2, chunk=3)
    assert q.shape == (2, 2)
    assert q[0, 0] == pytest.approx(0.75)  # recall a = 1/2, recall b = 1
    assert np.isnan(q[1, 0]) and np.isnan(q[0, 1]) and np.isnan(q[1, 1])


def test_relational_matches_open_clip_for_one_teacher_and_masks_missing_rows():
    s_i, s_t = unit(5, 4, seed=0), unit(5, 4, seed=1)
    t_i, t_t = unit(5, 6, seed=2), unit(5, 6, seed=3)
    scale, t_scale = torch.tensor(20.0), 1 / 0.07
    ours = relational_distillation(s_i, s_t, scale, [(t_i, t_t)], torch.ones(5, 1, dtype=torch.bool), t_scale)
    _, distill = DistillClipLoss()(s_i, s_t, scale, t_i, t_t, torch.tensor(t_scale))
    assert torch.allclose(ours.mean(), distill, rtol=1e-5)

    # two teachers of native dims 3 and 2, the second missing sample 1: by hand
    avail = np.array([[1, 1], [1, 0], [1, 1]], bool)
    ti = [np.array([[1.0, 0, 0], [0, 1, 0], [0.6, 0.8, 0]]), np.array([[1.0, 0], [0, 0], [0, 1.0]])]
    tt = [np.array([[0.6, 0.8, 0], [0, 0.6, 0.8], [1, 0, 0]]), np.array([[0.8, 0.6], [0, 0], [0.6, 0.8]])]
    sup = Supervision(["p", "q"], avail, raw=Arrays(["p", "q"], ti, tt, avail))
    loss, parts = run_loss(RelationalObjective(sup, cfg(teacher_temperature=0.5, relational_weight=3.0), 0))
    S = SCALE * S_IMG @ S_TXT.T
    kd = {}
    for t, rows in ((0, [0, 1, 2]), (1, [0, 2])):
        G = 2.0 * ti[t] @ tt[t].T
        for k, i in enumerate(rows):
            kd[i, t] = 0.5 * (np_soft_ce(G[i, rows], S[i, rows]) + np_soft_ce(G[rows, i], S[rows, i]))
    expected = (0.5 * kd[0, 0] + 0.5 * kd[0, 1] + kd[1, 0] + 0.5 * kd[2, 0] + 0.5 * kd[2, 1]) / 3
    assert math.isclose(parts["loss_relational"], expected, rel_tol=1e-5)
    assert math.isclose(loss, np_clip(S_IMG, S_TXT, SCALE) + 3 * expected, rel_tol=1e-5)


# ------------------------------------------------------------------ the ICL temperature, state, distribution


def test_icl_temperature_has_its_own_group_and_is_clamped_in_place():
    avail = np.ones((3, 1), bool)
    sup = Supervision(["a"], avail, aligned=Arrays(["a"], T_IMG[:1], T_TXT[:1], avail))
    obj = MeanObjective(sup, cfg(icl_lr=0.02), 0)
    (group,) = obj.param_groups()
    assert group["params"] == [obj.icl_logit] and group["lr"] == 0.02 and group["weight_decay"] == 0.0
    assert MeanObjective(sup, cfg(learn_icl_temperature=False), 0).param_groups() == []
    # its own lr: one Adam step moves the log-scale by ~icl_lr, whatever the model's lr
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.2}]
                            + obj.param_groups(), lr=1e-6)
    before = obj.icl_logit.item()
    idx = torch.tensor([0, 1, 2])
    obj.begin_step(idx)
    loss, _ = obj.loss(torch.tensor(S_IMG, dtype=torch.float32), torch.tensor(S_TXT, dtype=torch.float32),
                       torch.tensor(SCALE), idx)
    loss.backward()
    opt.step()
    obj.after_step()
    assert abs(obj.icl_logit.item() - before) == pytest.approx(0.02, rel=1e-3)
    with torch.no_grad():
        obj.icl_logit.fill_(9.0)  # as if the optimiser overshot: after_step puts it back in place
    obj.after_step()
    assert obj.icl_logit.item() == pytest.approx(math.log(100)) and obj.icl_temperature == pytest.approx(0.01)
    assert obj.summary()["icl_temperature"] == pytest.approx(0.01)
    # an out-of-range initial temperature is clamped at once, so the first loss already uses a legal value
    assert MeanObjective(sup, cfg(icl_init_temperature=0.01), 0).icl_temperature == pytest.approx(0.01)


def test_reference_state_dict_round_trip_resumes_the_same_draws():
    avail = np.array([[1, 1], [1, 1], [1, 0], [0, 1]], bool)
    feats = Arrays(["a", "b"], [np.ones((4, 2))] * 2, [np.ones((4, 2))] * 2, avail)
    sup = Supervision(["a", "b"], avail, aligned=feats)
    first = ReferenceObjective(sup, cfg(), seed=3)
    idx = torch.arange(4)
    for _ in range(5):
        first.begin_step(idx)
    with torch.no_grad():
        first.icl_logit.fill_(1.5)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = ReferenceObjective(sup, cfg(), seed=99)
    again.load_state_dict(state)
    assert again.icl_logit.item() == 1.5 and torch.equal(again.mass, first.mass)
    for _ in range(10):
        a, b = first.sampler.draw(idx), again.sampler.draw(idx)
        assert torch.equal(a, b)
    draws = torch.stack([first.sampler.draw(idx) for _ in range(200)])
    assert set(draws[:, 2].tolist()) == {0} and set(draws[:, 3].tolist()) == {1}
    assert set(STRATEGIES) == {"reference", "mean", "routed", "relational"}


def _objective(kind):
    rng = np.random.default_rng(0)
    n, names = 4, ["a", "b"]
    avail = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], bool)
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    img = [norm(rng.normal(size=(n, 3))) for _ in names]
    txt = [norm(rng.normal(size=(n, 3))) for _ in names]
    feats = Arrays(names, img, txt, avail)
    sup = Supervision(names, avail, aligned=feats, raw=feats, modality=np.array([0, 0, 1, 1]), modalities=["x", "y"],
                      quality=np.array([[0.9, 0.4], [0.5, 0.8]]), routed=np.ones((2, 2), bool))
    return kind(sup, cfg(), seed=0)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_processes_take_the_single_process_gradients(name, monkeypatch):
    """Simulated 2-rank run: each rank holds 2 of the 4 rows and gathers the others (no gradient), the loop
    multiplies the loss by the world size, DDP averages the model's gradients (features, logit scale); the
    objective's own ICL parameter is not in DDP. Every gradient must equal the single-process one."""
    s_img, s_txt = unit(4, 3, seed=5), unit(4, 3, seed=6)
    idx = torch.arange(4)

    def grads(world, rank):
        obj = _objective(STRATEGIES[name])
        img = s_img[rank * 4 // world:(rank + 1) * 4 // world].clone().requires_grad_(True)
        txt = s_txt[rank * 4 // world:(rank + 1) * 4 // world].clone().requires_grad_(True)
        logit = torch.tensor(2.5, requires_grad=True)

        def gather(t):
            full = s_img if t is img else s_txt
            parts = list(full.detach().chunk(world))
            parts[rank] = t
            return torch.cat(parts)

        monkeypatch.setattr(strategies, "gather_batch", gather)
        monkeypatch.setattr(distributed, "world_size", lambda: world)  # what `replicated` divides by
        obj.begin_step(idx)
        loss, _ = obj.loss(img, txt, logit.exp(), idx)
        (loss * world).backward()
        icl = obj.icl_logit.grad if obj.uses_icl else torch.tensor(0.0)
        return img.grad, txt.grad, logit.grad, icl, loss.item()

    one = grads(1, 0)
    r0, r1 = grads(2, 0), grads(2, 1)
    assert r0[4] == pytest.approx(one[4], rel=1e-6) == pytest.approx(r1[4], rel=1e-6)
    # feature gradients (DDP averages over 2 ranks) and the averaged logit-scale gradient equal one process's
    assert torch.allclose(torch.cat([r0[0], r1[0]]) / 2, one[0], atol=1e-6)
    assert torch.allclose(torch.cat([r0[1], r1[1]]) / 2, one[1], atol=1e-6)
    assert torch.allclose((r0[2] + r1[2]) / 2, one[2], atol=1e-6)
    # the ICL parameter is outside DDP: each rank's own gradient must already be the single-process one
    assert torch.allclose(r0[3], one[3], atol=1e-6) and torch.allclose(r1[3], one[3], atol=1e-6)


def test_accumulation_gives_objective_scalars_one_gradient_per_step():
    """With accum_steps micro-batch passes over the whole batch, the ICL scale takes its gradient once."""
    avail = np.ones((3, 1), bool)
    sup = Supervision(["a"], avail, aligned=Arrays(["a"], T_IMG[:1], T_TXT[:1], avail))
    idx = torch.tensor([0, 1, 2])
    x = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (S_IMG, S_TXT)]
    grads = []
    for accum in (1, 3):
        obj = MeanObjective(sup, DistillCfg(train=TrainCfg(accum_steps=accum)), 0)
        obj.begin_step(idx)
        for _ in range(accum):
            obj.loss(*x, torch.tensor(SCALE), idx)[0].backward()
        grads.append(obj.icl_logit.grad.item())
    assert grads[1] == pytest.approx(grads[0], rel=1e-6)
    with pytest.raises(RuntimeError, match="begin_step"):
        MeanObjective(sup, cfg(), 0).loss(*x, torch.tensor(SCALE), idx)


def test_fd_per_sample_handles_stacked_teachers():
    s = unit(3, 4)
    t = torch.stack([unit(3, 4, seed=1), unit(3, 4, seed=2)], 1)
    per = fd_per_sample(s, s, t, t)
    assert per.shape == (3, 2)
    assert torch.allclose(per[:, 1], fd_per_sample(s, s, t[:, 1], t[:, 1]))
    assert clip_loss(s, s, torch.tensor(1.0)).ndim == 0


def test_modality_focus_moves_distillation_weight_to_the_lagging_modality():
    from mmkd.training.quality import focus_factors, modality_lag

    # teachers [a, b]; a declared for both modalities, b for modality 1 only
    quality = np.array([[0.9, 0.5], [np.nan, 0.7]])  # [T, M]
    routed = np.array([[True, False], [True, True]])  # [M, T]
    # modality 0: best declared teacher 0.9, student 0.6 -> lag 0.3; modality 1: the student is ahead -> 0
    assert modality_lag(quality, np.array([0.6, 0.8]), routed) == pytest.approx([0.3, 0.0])
    # b's 0.99 on modality 0 does not count (not declared there); a student not measurable lags by nothing
    assert modality_lag(np.array([[0.9, 0.5], [0.99, 0.7]]), np.array([np.nan, 0.6]), routed) == pytest.approx(
        [0.0, 0.1])
    f = focus_factors(np.array([0.3, 0.0]), np.array([0, 1, 1, 1]), focus=2.0)
    assert f == pytest.approx(np.array([1.6, 1.0]) / 1.15)  # 1 + 2 * lag, mean 1 over the four samples
    assert np.array([f[m] for m in (0, 1, 1, 1)]).mean() == pytest.approx(1.0)

    # in the loss: each sample's FD and ICL weight is its modality's factor (one teacher, all samples)
    avail = np.ones((3, 1), bool)
    modality = np.array([0, 1, 0])
    feats = Arrays(["a"], T_IMG[:1], T_TXT[:1], avail)
    sup = Supervision(["a"], avail, aligned=feats, modality=modality, modalities=["x", "y"],
                      focus=np.array([1.5, 0.5]), student_quality=np.array([0.4, np.nan]))
    obj = MeanObjective(sup, cfg(icl_init_temperature=0.5), 0)
    _, parts = run_loss(obj)
    fd_i = [(((S_IMG[i] - T_IMG[0][i]) ** 2).sum() + ((S_TXT[i] - T_TXT[0][i]) ** 2).sum()) / 512 for i in range(3)]
    icl = np_icl_terms(S_IMG, S_TXT, T_IMG[0], T_TXT[0], [0, 1, 2], 2.0)
    icl_i = [icl[i] for i in range(3)]
    factor = np.array([1.5, 0.5, 1.5])
    assert parts["loss_fd"] == pytest.approx(float(np.mean(factor * fd_i)), rel=1e-5)
    assert parts["loss_icl"] == pytest.approx(float(np.mean(factor * icl_i)), rel=1e-5)
    assert obj.summary()["focus.x"] == 1.5 and obj.summary()["student_quality.x"] == 0.4
    assert "student_quality.y" not in obj.summary() and obj.report()["focus"] == {"x": 1.5, "y": 0.5}


def test_probe_accuracy_equals_a_ridge_classifier_on_the_same_folds():
    """sampling_focus's probe (closed-form ridge on one-hot classes) predicts what scikit-learn's RidgeClassifier
    predicts on the same folds; balanced accuracy is the mean per-class recall."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import PredefinedSplit, cross_val_predict

    from mmkd.training.quality import probe_accuracy

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90).astype(str)
    x = rng.normal(size=(90, 12)) + 0.8 * np.eye(12)[np.unique(y, return_inverse=True)[1]]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    folds = np.random.default_rng(7).permutation(90) % 5
    pred = cross_val_predict(RidgeClassifier(alpha=1.0), x, y, cv=PredefinedSplit(folds))
    assert probe_accuracy(x, y, seed=7) == pytest.approx(balanced_accuracy_score(y, pred))
    assert np.isnan(probe_accuracy(x[:5], np.array(["a"] * 5), seed=0))  # one class: not measurable


def test_probe_lag_is_the_best_declared_teachers_probe_minus_the_students():
    from mmkd.training.quality import probe_lag

    rng = np.random.default_rng(0)
    n = 120
    modality = np.repeat([0, 1], n // 2)
    labels = np.array([str(i % 2) for i in range(n)], dtype=object)
    labels[5] = None  # unlabelled: left out
    signal = np.eye(8)[np.array([i % 2 for i in range(n)])] * 3
    sharp, noise = signal + rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    teachers = {"a": sharp.copy(), "b": sharp.copy()}
    teachers["b"][modality == 1] = np.nan  # b has no rows of modality 1
    routed = np.array([[True, False], [True, True]])  # [M, T]: b is declared for modality 1 only
    student = np.where((modality == 0)[:, None], noise, sharp)  # behind on modality 0, level on modality 1
    lag, q, qs = probe_lag(teachers, student, labels, modality, 2, routed, ["a", "b"], seed=0)
    assert q[0, 0] > 0.9 and np.isnan(q[1, 0]) and np.isnan(q[1, 1])  # not declared / no rows
    assert lag[0] == pytest.approx(q[0, 0] - qs[0]) and lag[0] > 0.3
    assert lag[1] == pytest.approx(max(0.0, q[0, 1] - qs[1]))


def test_modality_focus_is_refused_where_no_per_sample_teacher_weights_exist():
    from pydantic import ValidationError

    assert cfg(strategy="routed", modality_focus=2.0).modality_focus == 2.0
    for strategy in ("reference", "relational"):
        with pytest.raises(ValidationError, match="modality_focus"):
            cfg(strategy=strategy, modality_focus=1.0)


def test_image_structure_matches_a_brute_force_soft_cross_entropy():
    from mmkd.training.losses import image_structure

    rng = np.random.default_rng(0)
    b, t, d = 6, 2, 4
    s_img = unit(b, d, seed=1)
    t_img = unit(b, t, d, seed=2)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 1]], dtype=torch.bool)
    mod = np.array([0, 0, 0, 1, 1, 0])
    same = torch.from_numpy(mod[:, None] == mod[None, :])
    got = image_structure(s_img, t_img, mask, same, 10.0).double().numpy()
    S, T = s_img.double().numpy(), t_img.double().numpy()
    want = np.zeros((b, t))
    for k in range(t):
        for i in range(b):
            cand = [j for j in range(b) if j != i and mask[j, k] and mod[j] == mod[i]]
            if not mask[i, k] or len(cand) < 2:
                continue
            p = np.exp(np_log_softmax([10 * T[i, k] @ T[j, k] for j in cand]))
            want[i, k] = -(p * np_log_softmax([10 * S[i] @ S[j] for j in cand])).sum()
    assert np.allclose(got, want, atol=1e-5)
    assert want[3].sum() == 0 and want[4].sum() == 0  # modality 1 has two samples: one candidate, nothing to rank
    assert (want[[0, 2, 5], 0] > 0).all() and want[1, 1] == 0
    # the student reproducing the teacher's image cosines is the minimum: the term equals the teacher's entropy
    same_geometry = image_structure(t_img[:, 0], t_img[:, :1], mask[:, :1], same, 10.0)
    perturbed = image_structure(F.normalize(t_img[:, 0] + 0.3 * s_img, dim=1), t_img[:, :1], mask[:, :1], same, 10.0)
    assert float(same_geometry.sum()) < float(perturbed.sum())
    del rng


def test_structure_weight_adds_the_image_structure_term_to_mean_and_routed():
    from pydantic import ValidationError

    avail = np.ones((3, 1), bool)
    sup = Supervision(["a"], avail, aligned=Arrays(["a"], T_IMG[:1], T_TXT[:1], avail), modality=np.array([0, 0, 0]),
                      modalities=["x"])
    plain, _ = run_loss(MeanObjective(sup, cfg(icl_init_temperature=0.5), 0))
    loss, parts = run_loss(MeanObjective(sup, cfg(strategy="mean", icl_init_temperature=0.5, structure_weight=2.0,
                                                  structure_temperature=0.1), 0))
    rows = []
    for i in range(3):
        cand = [j for j in range(3) if j != i]
        p = np.exp(np_log_softmax([10 * T_IMG[0][i] @ T_IMG[0][j] for j in cand]))
        rows.append(-(p * np_log_softmax([10 * S_IMG[i] @ S_IMG[j] for j in cand])).sum())
    assert parts["loss_structure"] == pytest.approx(float(np.mean(rows)), rel=1e-5)
    assert loss == pytest.approx(plain + 2.0 * parts["loss_structure"], rel=1e-5)
    for strategy in ("reference", "relational"):
        with pytest.raises(ValidationError, match="structure_weight"):
            cfg(strategy=strategy, structure_weight=1.0)
