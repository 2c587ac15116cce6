"""Owns what every stage-2 strategy is given and shares: Supervision, the teacher draw, the DistillObjective base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmkd.config import DistillCfg
from mmkd.training.objective import Objective


class TeacherSampler:
    """Draws, per sample and per step, one teacher uniformly among those eligible for it."""

    def __init__(self, eligible: np.ndarray, seed: int):
        self.eligible = torch.from_numpy(np.asarray(eligible, dtype=bool))
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, idx: torch.Tensor) -> torch.Tensor:
        mask = self.eligible[idx].float()
        return torch.multinomial(mask / mask.sum(1, keepdim=True), 1, generator=self.gen).squeeze(1)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])


@dataclass
class Supervision:
    """What a strategy knows about the train split's teachers (built by training.distill.distill)."""

    names: list[str]                      # teachers, registry order
    eligible: np.ndarray                  # [N, T] bool: may supervise the sample (routed and has features)
    aligned: Any = None                   # projected, student-dim features (features.store.TeacherFeatures)
    raw: Any = None                       # raw, native-dim features (TeacherFeatures over the raw store)
    modality: np.ndarray | None = None    # [N] int: index of each sample's modality in `modalities`
    modalities: list[str] | None = None
    quality: np.ndarray | None = None     # [T, M] probe balanced accuracy (NaN: not measurable)
    routed: np.ndarray | None = None      # [M, T] bool: the teacher is declared for the modality
    student_quality: np.ndarray | None = None  # [M] the stage-1 student's probe balanced accuracy (modality_focus)
    focus: np.ndarray | None = None       # [M] distillation weight factor per modality (modality_focus; None: 1)


def _open_shards(features) -> None:
    """Open (and check) every feature shard `features` reads, in this thread: the loop's reader thread reads
    them, and a store's SQLite index answers only the thread that opened it."""
    shard = getattr(features, "shard", None)  # TeacherFeatures' [N, T] shard ids (-1: no row)
    if shard is not None:
        for s in np.unique(shard[shard >= 0]):
            features.store.checked(int(s))


class DistillObjective(Objective):
    """What every strategy shares: teachers, eligibility, the per-teacher weight mass (teacher shares)."""

    needs: tuple[str, ...] = ()  # which Supervision fields distill() must fill: "aligned", "raw", "quality"
    uses_icl = False

    def __init__(self, sup: Supervision, cfg: DistillCfg, seed: int, device: torch.device | str = "cpu"):
        self.sup, self.cfg, self.device = sup, cfg, torch.device(device)
        self.names = list(sup.names)
        self.eligible = torch.from_numpy(np.asarray(sup.eligible, dtype=bool))
        self.mass = torch.zeros(len(self.names), dtype=torch.float64)  # summed per-sample teacher weights
        self.accum_steps = cfg.train.accum_steps
        self._calls = 0
        self._batch: dict | None = None
        if cfg.train.prefetch:
            for features in (sup.aligned, sup.raw):
                _open_shards(features)

    def begin_step(self, idx: torch.Tensor, fetched=None) -> None:
        idx = torch.as_tensor(idx, dtype=torch.long)
        self._calls = 0
        self._batch = self.prepare(idx, self.fetch(idx) if fetched is None else fetched)

    def prepare(self, idx: torch.Tensor, fetched) -> dict:
        """The step's targets from what `fetch(idx)` read (the loop's reader may have read it ahead)."""
        raise NotImplementedError

    def _last_pass(self) -> bool:
        """True on the micro-batch pass that takes the gradient of objective-owned scalars: with accumulation the
        loop calls `loss` accum_steps times per step, each over the whole batch, and the logit scale (so, too,
        the ICL temperature) takes its gradient in one pass only."""
        self._calls += 1
        return self._calls >= self.accum_steps

    def _prepared(self, idx: torch.Tensor) -> dict:
        if self._batch is None or not torch.equal(self._batch["idx"], torch.as_tensor(idx, dtype=torch.long)):
            raise RuntimeError("the training loop must call begin_step(idx) before loss(..., idx)")
        return self._batch

    def mean_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T]: 1 / (number of eligible teachers) on each eligible teacher of each sample."""
        m = self.eligible[idx].double()
        return m / m.sum(1, keepdim=True)

    def state_dict(self) -> dict:
        return {"mass": self.mass.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mass.copy_(state["mass"])

    def shares(self) -> dict[str, float]:
        total = float(self.mass.sum()) or 1.0
        return {t: float(m) / total for t, m in zip(self.names, self.mass.tolist())}

    def summary(self) -> dict[str, float]:
        return {f"teacher_share_{t}": s for t, s in self.shares().items()}

    def report(self) -> dict:
        """What the run learnt about its teachers, for teacher_weights.json next to the student."""
        return {"strategy": self.cfg.strategy, "teachers": self.names, "teacher_share": self.shares()}
