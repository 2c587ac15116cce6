"""Owns the one CLIP training loop (teachers, stage 1, stage 2): AdamW groups, warm-up + cosine, seeded order."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from mmkd.progress import progress

from mmkd.config import TrainCfg
from mmkd.models.factory import image_spec, to_tensor

MAX_LOGIT_SCALE = math.log(100.0)
StepFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def param_groups(modules: list[torch.nn.Module | torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """No decay on biases, norms, other 1-d params and the logit scale (the CLIP recipe)."""
    decay, no_decay, seen = [], [], set()
    for mod in modules:
        named = [("", mod)] if isinstance(mod, torch.nn.Parameter) else list(mod.named_parameters())
        for name, p in named:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim < 2 or "logit_scale" in name or "bias" in name or "ln" in name or "norm" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    model: torch.nn.Module,
    images: np.ndarray,
    tokens: "Tokens | torch.Tensor",
    cfg: TrainCfg,
    step_fn: StepFn,
    seed: int,
    device: torch.device,
    desc: str,
    log: Callable[[dict, int], None] | None = None,
    extra_params: list[torch.nn.Parameter] | None = None,
    log_every: int = 10,
) -> dict:
    """Run cfg.epochs over (images, tokens); step_fn(model, x, tok, idx) returns (loss, parts)."""
    n = len(images)
    if n < 2:
        raise ValueError(f"{desc}: need at least 2 training pairs, got {n}")
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged tail: contrastive losses want full batches
    total = steps_per_epoch * cfg.epochs
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups([model, *(extra_params or [])], cfg.weight_decay),
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, total))
    gen = torch.Generator().manual_seed(seed)
    spec = image_spec(model)
    use_bf16 = cfg.precision == "bf16"
    history: dict[str, float] = {}
    step, t0 = 0, time.perf_counter()
    with progress(total=total, desc=desc, unit="step") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for b in range(steps_per_epoch):
                idx = order[b * batch : (b + 1) * batch]
                idx_np = np.sort(idx.numpy())  # sorted reads are kinder to memory-mapped shards
                idx = torch.from_numpy(idx_np)
                x = to_tensor(images[idx_np], spec, device, augment=cfg.augment, generator=gen)
                tok = tokens[idx].to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss, parts = step_fn(model, x, tok, idx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                step += 1
                parts = {"loss": loss.item(), **parts}
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
                bar.update(1)
                if log and (step % log_every == 0 or step == total):
                    log({**parts, "lr": sched.get_last_lr()[0], "epoch": epoch}, step)
                history = parts
                if step % 16 == 0 and hasattr(images, "release"):
                    images.release()  # memory-mapped views: keep RSS flat however large the corpus
    model.eval()
    history.update({"steps": step, "train_seconds": time.perf_counter() - t0, "pairs": n})
    return history


class Tokens:
    """Captions tokenised per batch when indexed: no [N, context] tensor for the whole corpus in memory."""

    def __init__(self, tokenizer: Callable, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.tokenizer([self.texts[int(i)] for i in idx])


def tokenize_all(tokenizer: Callable, texts: list[str]) -> Tokens:
    return Tokens(tokenizer, texts)
