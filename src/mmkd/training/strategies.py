"""Owns the stage-2 distillation strategies: one Objective per `distill.strategy`, looked up in STRATEGIES.

- reference:  per sample and step one teacher drawn uniformly among the eligible ones (the MMKD-CLIP recipe);
              task + fd_weight * FD + icl_weight * ICL against that teacher's aligned (projected) features.
- mean:       FD and ICL against every eligible teacher of each sample, averaged over those teachers.
- routed:     as mean, but each sample's teachers weighted by softmax(quality / routed_temperature), the quality
              being each teacher's nearest-class-prototype balanced accuracy on the probe split of the sample's
              modality (raw teacher features): the specialist speaks loudest in its domain.
- relational: the teachers' in-batch image-text similarity structure (raw features, native dims), distilled with
              soft-target cross entropy (open_clip's DistillClipLoss), averaged over each sample's teachers.

Every objective reads teacher features from the stores only (no teacher runs), in `fetch` (which the loop's
reader may run ahead, in its thread), once per optimiser step for the whole GLOBAL batch (identical on every rank),
and computes its loss over the gathered global batch, so a run on N processes optimises exactly what one process
would. The base they share is training/supervision.py, the routed weights training/quality.py;
docs/distillation.md has the formulas.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmkd.config import DistillCfg
from mmkd.training.distributed import gather_batch, replicated
from mmkd.training.losses import (
    clip_loss,
    distillation_loss,
    fd_per_sample,
    image_structure,
    masked_interactive_contrastive,
    relational_distillation,
    weighted_mean,
)
from mmkd.training.quality import routed_scores, routed_weights
from mmkd.training.supervision import DistillObjective, Supervision, TeacherSampler

MAX_LOGIT_SCALE = math.log(100.0)  # the same bound as the student's logit scale (temperature >= 0.01)


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


class FeatureObjective(DistillObjective):
    """FD + ICL against the aligned features, with the learnable ICL temperature.

    The temperature is a log-scale parameter (scale = exp(p), temperature = 1/scale) in its own optimiser group
    (lr `icl_lr`, no weight decay), clamped in place after every step to [ln 1, ln 100] (temperature in
    [0.01, 1]), so the value used in the loss is the value stored in model.json.
    """

    needs = ("aligned",)
    uses_icl = True

    def __init__(self, sup: Supervision, cfg: DistillCfg, seed: int, device: torch.device | str = "cpu"):
        super().__init__(sup, cfg, seed, device)
        init = min(max(math.log(1.0 / cfg.icl_init_temperature), 0.0), MAX_LOGIT_SCALE)
        self.icl_logit = torch.nn.Parameter(torch.tensor(init, device=self.device),
                                            requires_grad=cfg.learn_icl_temperature)

    def param_groups(self) -> list[dict]:
        if not self.cfg.learn_icl_temperature:
            return []
        return [{"params": [self.icl_logit], "lr": self.cfg.icl_lr, "weight_decay": 0.0}]

    def after_step(self) -> None:
        with torch.no_grad():
            self.icl_logit.clamp_(0.0, MAX_LOGIT_SCALE)

    def icl_scale(self, last: bool) -> torch.Tensor:
        scale = self.icl_logit.exp()
        return replicated(scale) if last else scale.detach()

    @property
    def icl_temperature(self) -> float:
        """The temperature the loss uses (the parameter is kept inside its bounds in place)."""
        return float(1.0 / self.icl_logit.detach().exp())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "icl_logit": self.icl_logit.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.icl_logit.copy_(state["icl_logit"])

    def summary(self) -> dict[str, float]:
        return {**super().summary(), "icl_temperature": self.icl_temperature}

    def report(self) -> dict:
        return {**super().report(), "icl_temperature": self.icl_temperature}


class ReferenceObjective(FeatureObjective):
    """The reference recipe: one uniformly drawn eligible teacher per sample and step; task + FD + ICL.

    ICL is the reference's: the student contrasted against the batch of drawn targets (each column is some
    sample's drawn teacher)."""

    def __init__(self, sup: Supervision, cfg: DistillCfg, seed: int, device: torch.device | str = "cpu"):
        super().__init__(sup, cfg, seed, device)
        self.sampler = TeacherSampler(sup.eligible, seed + 1)
        self._sampler_state: torch.Tensor | None = None  # the sampler's state after the last step taken

    def fetch(self, idx):
        """Draws each sample's teacher and reads only those rows. Batches are fetched in step order, so the draws
        are the synchronous run's; the sampler's state after each draw travels with its batch, so a checkpoint
        holds the state of the steps taken, not of the batches read ahead."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        choice = self.sampler.draw(idx)
        t_img, t_txt = self.sup.aligned.chosen(idx.numpy(), choice.numpy())
        return {"choice": choice, "t_img": t_img, "t_txt": t_txt, "sampler": self.sampler.gen.get_state()}

    def prepare(self, idx, fetched):
        choice, self._sampler_state = fetched["choice"], fetched["sampler"]
        self.mass += torch.bincount(choice, minlength=len(self.names)).double()
        return {"idx": idx, "t_img": _tensor(fetched["t_img"], self.device),
                "t_txt": _tensor(fetched["t_txt"], self.device)}

    def loss(self, img, txt, logit_scale, idx):
        b = self._prepared(idx)
        last = self._last_pass()
        s_img, s_txt = gather_batch(img), gather_batch(txt)
        icl_scale = self.icl_scale(last)
        total, parts = distillation_loss(s_img, s_txt, b["t_img"], b["t_txt"], replicated(logit_scale), icl_scale,
                                         self.cfg.fd_weight, self.cfg.icl_weight, self.cfg.fd_reference_dim)
        return total, {**parts, "icl_temperature": float(1.0 / icl_scale.detach())}

    def state_dict(self) -> dict:
        taken = self.sampler.state_dict() if self._sampler_state is None else {"generator": self._sampler_state}
        return {**super().state_dict(), "sampler": taken}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])
        self._sampler_state = None


class MeanObjective(FeatureObjective):
    """FD and ICL against every eligible teacher of each sample, weighted by W [B, T] (rows sum to 1):
    FD = (1/B) sum_i sum_t W[i,t] fd[i,t];  ICL = (1/B) sum_i sum_t W[i,t] icl[i,t], icl[i,t] being teacher t's
    contrastive term over the batch samples it supervises (losses.masked_interactive_contrastive).
    mean: W[i, t] = 1/|T_i| on the sample's eligible teachers T_i."""

    def weights(self, idx: torch.Tensor) -> torch.Tensor:
        return self.mean_weights(idx)

    def fetch(self, idx):
        return self.sup.aligned.stacked(torch.as_tensor(idx, dtype=torch.long).numpy())[:2]

    def prepare(self, idx, fetched):
        w = self.weights(idx)
        if self.sup.focus is not None:  # modality_focus: the lagging modalities' samples weigh more
            w = w * torch.from_numpy(self.sup.focus[self.sup.modality[idx.numpy()]])[:, None]
        self.mass += w.sum(0)
        t_img, t_txt = fetched
        out = {"idx": idx, "w": w.float().to(self.device), "mask": (w > 0).to(self.device),
               "t_img": _tensor(t_img, self.device), "t_txt": _tensor(t_txt, self.device)}
        if self.cfg.structure_weight > 0:
            mod = torch.from_numpy(np.asarray(self.sup.modality)[idx.numpy()])
            out["same"] = (mod[:, None] == mod[None, :]).to(self.device)
        return out

    def loss(self, img, txt, logit_scale, idx):
        b = self._prepared(idx)
        last = self._last_pass()
        s_img, s_txt = gather_batch(img), gather_batch(txt)
        icl_scale = self.icl_scale(last)
        task = clip_loss(s_img, s_txt, replicated(logit_scale))
        fd = weighted_mean(fd_per_sample(s_img, s_txt, b["t_img"], b["t_txt"], self.cfg.fd_reference_dim), b["w"])
        icl = weighted_mean(masked_interactive_contrastive(s_img, s_txt, b["t_img"], b["t_txt"], b["mask"],
                                                           icl_scale), b["w"])
        total = task + self.cfg.fd_weight * fd + self.cfg.icl_weight * icl
        parts = {"loss_task": task.item(), "loss_fd": fd.item(), "loss_icl": icl.item(),
                 "icl_temperature": float(1.0 / icl_scale.detach())}
        if self.cfg.structure_weight > 0:
            st = weighted_mean(image_structure(s_img, b["t_img"], b["mask"], b["same"],
                                               1.0 / self.cfg.structure_temperature), b["w"])
            total = total + self.cfg.structure_weight * st
            parts["loss_structure"] = st.item()
        return total, parts

    def summary(self):
        out = super().summary()
        if self.sup.focus is not None:
            for m, mod in enumerate(self.sup.modalities):
                out[f"focus.{mod}"] = float(self.sup.focus[m])
                if np.isfinite(self.sup.student_quality[m]):
                    out[f"student_quality.{mod}"] = float(self.sup.student_quality[m])
        return out

    def report(self):
        out = super().report()
        if self.sup.focus is not None:
            sq = self.sup.student_quality
            out["modality_focus"] = self.cfg.modality_focus
            out["focus"] = {mod: float(self.sup.focus[m]) for m, mod in enumerate(self.sup.modalities)}
            out["student_quality"] = {mod: (float(sq[m]) if np.isfinite(sq[m]) else None)
                                      for m, mod in enumerate(self.sup.modalities)}
        return out


class RoutedObjective(MeanObjective):
    """mean, with W[i, t] = softmax over the sample's eligible teachers of quality[t, m_i] / routed_temperature."""

    needs = ("aligned", "quality")

    def __init__(self, sup: Supervision, cfg: DistillCfg, seed: int, device: torch.device | str = "cpu"):
        super().__init__(sup, cfg, seed, device)
        if sup.quality is None or sup.modality is None or sup.routed is None:
            raise ValueError("the routed strategy needs each teacher's probe quality, the samples' modalities and "
                             "the routing table")
        self.scores = torch.from_numpy(routed_scores(sup.quality, cfg.routed_temperature))  # [M, T]
        self.modality = torch.from_numpy(np.asarray(sup.modality, dtype=np.int64))
        self.table = routed_weights(sup.quality, sup.routed, cfg.routed_temperature)  # [M, T]

    def weights(self, idx):
        s = self.scores[self.modality[idx]].masked_fill(~self.eligible[idx], -math.inf)
        return s.softmax(1)

    def summary(self):
        out = super().summary()
        for m, mod in enumerate(self.sup.modalities):
            for t, name in enumerate(self.names):
                out[f"route_weight.{mod}.{name}"] = float(self.table[m, t])
                if np.isfinite(self.sup.quality[t, m]):
                    out[f"route_quality.{mod}.{name}"] = float(self.sup.quality[t, m])
        return out

    def report(self):
        q = self.sup.quality
        return {**super().report(), "routed_temperature": self.cfg.routed_temperature,
                "quality": {mod: {t: (float(q[j, m]) if np.isfinite(q[j, m]) else None) for j, t in enumerate(self.names)}
                            for m, mod in enumerate(self.sup.modalities)},
                "weights": {mod: {t: float(self.table[m, j]) for j, t in enumerate(self.names)}
                            for m, mod in enumerate(self.sup.modalities)}}


class RelationalObjective(DistillObjective):
    """task + relational_weight * KD, KD = (1/B) sum_i sum_t W[i,t] kd[i,t] with W the mean weights and kd the
    soft-target cross entropy between teacher t's in-batch similarities (raw features / teacher_temperature)
    and the student's (logit scale), both ways, over the batch samples teacher t supervises."""

    needs = ("raw",)

    def fetch(self, idx):
        return self.sup.raw.batch(torch.as_tensor(idx, dtype=torch.long).numpy())

    def prepare(self, idx, fetched):
        w = self.mean_weights(idx)
        self.mass += w.sum(0)
        parts = fetched
        return {"idx": idx, "w": w.float().to(self.device), "mask": (w > 0).to(self.device),
                "teachers": [(_tensor(parts[t][0], self.device), _tensor(parts[t][1], self.device))
                             for t in self.names]}

    def loss(self, img, txt, logit_scale, idx):
        b = self._prepared(idx)
        self._last_pass()
        s_img, s_txt = gather_batch(img), gather_batch(txt)
        scale = replicated(logit_scale)
        task = clip_loss(s_img, s_txt, scale)
        kd = weighted_mean(relational_distillation(s_img, s_txt, scale, b["teachers"], b["mask"],
                                                   1.0 / self.cfg.teacher_temperature), b["w"])
        total = task + self.cfg.relational_weight * kd
        return total, {"loss_task": task.item(), "loss_relational": kd.item()}


STRATEGIES: dict[str, type[DistillObjective]] = {
    "reference": ReferenceObjective,
    "mean": MeanObjective,
    "routed": RoutedObjective,
    "relational": RelationalObjective,
}
