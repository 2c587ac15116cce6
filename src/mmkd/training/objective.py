"""Owns the contract between the training loop and what it optimises (stage-1 CLIP, the stage-2 strategies)."""

from __future__ import annotations

import torch

from mmkd.training.distributed import gather_batch, replicated
from mmkd.training.losses import clip_loss


class Objective:
    """What one training loop optimises. The loop owns batching, the forward pass (through DDP when distributed),
    the optimiser, the schedule, clipping, accumulation, checkpoints and logging; an objective owns the loss.

    `loss` receives this rank's unit-norm image and text features [b, D] (float32), the model's exp()'d logit
    scale, and the GLOBAL batch's sample indices [B] (identical on every rank; `gather_batch` turns [b, D] into
    [B, D] in the same order). It returns (loss over the global batch, detached float parts to log).
    """

    def param_groups(self) -> list[dict]:
        """Extra optimiser groups (each with its own lr / weight_decay), e.g. a learnable temperature."""
        return []

    def fetch(self, idx: torch.Tensor):
        """What the step `idx` reads from storage (teacher features), or None. The loop calls it in its batch
        reader, possibly in a background thread ahead of the step (train.prefetch), in step order, and passes the
        result to begin_step: it must only read, never touch what a checkpoint saves."""
        return None

    def begin_step(self, idx: torch.Tensor, fetched=None) -> None:
        """Called once per optimiser step with the global batch's indices (and `fetch(idx)` when not None),
        before `loss`. Draw per-step random choices here (or in fetch, in step order, saving what the steps taken
        drew: the reference strategy's teacher draws): with gradient accumulation `loss` is called once per
        micro-batch and must be a pure function of its inputs and what begin_step prepared."""

    def loss(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
             idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Runs after every optimiser step (in-place clamps)."""

    def state_dict(self) -> dict:
        """Everything needed to resume exactly (RNG states, counters): tensors and plain Python values only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict[str, float]:
        """Final metrics to report with the run's history."""
        return {}


class ClipObjective(Objective):
    """Stage 1 and the embedded teachers: symmetric InfoNCE over the global batch."""

    def loss(self, img, txt, logit_scale, idx):
        loss = clip_loss(gather_batch(img), gather_batch(txt), replicated(logit_scale))
        return loss, {"logit_scale": float(logit_scale.detach())}
