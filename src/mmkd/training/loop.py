"""Owns the one CLIP training loop (teachers, stage 1, stage 2): optimiser, schedule, accumulation, DDP, resume."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mmkd.config import TrainCfg
from mmkd.models.factory import image_spec, to_tensor
from mmkd.progress import progress
from mmkd.training import checkpoint, distributed
from mmkd.training.augment import draw_crops
from mmkd.training.objective import Objective
from mmkd.training.order import epoch_order, row_shards
from mmkd.training.prefetch import BatchReader, pin

MAX_LOGIT_SCALE = math.log(100.0)


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
    objective: Objective,
    seed: int,
    device: torch.device,
    desc: str,
    log: Callable[[dict, int], None] | None = None,
    state_dir: Path | None = None,
    fingerprint: dict | None = None,
    sample_weights: np.ndarray | None = None,
) -> dict:
    """Run cfg.epochs over (images, tokens) minimising objective; single-process or one rank under torchrun.

    Every `cfg.checkpoint_every` steps and at the end, rank 0 writes the whole training state to state_dir;
    with `cfg.resume: auto` a run whose state_dir holds an unfinished state of the same fingerprint continues
    from it, and on CPU ends with the weights an uninterrupted run would have. sample_weights: [n] each row's
    expected appearances per epoch (mean 1; training.order.weighted_order), with shuffle global; None: once each.
    """
    n = len(images)
    if n < 2:
        raise ValueError(f"{desc}: need at least 2 training pairs, got {n}")
    device = distributed.init_from_env(device)
    world, main = distributed.world_size(), distributed.is_main()
    batch = min(cfg.batch_size, n)
    batch -= batch % (world * cfg.accum_steps)  # every rank and micro-batch gets the same number of rows
    if batch < 2 * world:
        raise ValueError(f"{desc}: batch {cfg.batch_size} is too small for {world} processes x "
                         f"{cfg.accum_steps} accumulation steps")
    rows = distributed.local_slice(batch)
    steps_per_epoch = n // batch  # drop the ragged tail: contrastive losses want full batches
    total = steps_per_epoch * cfg.epochs
    model.to(device).train()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one pass over each parameter's memory per step instead of ~10 elementwise ops, which on a CPU is 11% of
    # a small CLIP's step (the 49408-row token embedding dominates the parameter count; docs/benchmarks.md)
    opt = torch.optim.AdamW(param_groups([model], cfg.weight_decay) + objective.param_groups(),
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, total))
    gen = torch.Generator().manual_seed(seed)
    spec = image_spec(model)
    # prefetch never changes results; the shard-order knobs only matter (and so only count) when shuffling by shards
    unprinted = {"resume", "checkpoint_every", "log_every", "prefetch",
                 *(("shuffle", "shuffle_shards", "shuffle_buffer") if cfg.shuffle == "global" else ())}
    print_fp = checkpoint.fingerprint(desc, cfg.model_dump(exclude=unprinted), n, seed, world, fingerprint or {})
    state = distributed.broadcast_object(checkpoint.resumable(state_dir, cfg.resume, print_fp, desc) is not None)
    step, epoch, pos, order, history, resumed_from = 0, 0, 0, None, {}, None
    if state:
        saved = checkpoint.load_state(state_dir)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        objective.load_state_dict(saved["objective"])
        checkpoint.set_rng_state(saved["rng"], gen)
        step, epoch, pos, order, history = saved["step"], saved["epoch"], saved["pos"], saved["order"], saved["history"]
        resumed_from = step

    def save(complete: bool = False) -> None:
        if state_dir is None or not main:
            return
        checkpoint.save_state(state_dir, {
            "fingerprint": print_fp, "complete": complete, "step": step, "epoch": epoch, "pos": pos, "order": order,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "objective": objective.state_dict(), "rng": checkpoint.rng_state(gen), "history": history})

    use_bf16 = cfg.precision == "bf16"
    shard_of = row_shards(images) if cfg.shuffle == "shards" else None
    pinned = device.type == "cuda" and cfg.prefetch > 0

    def gather(idx: torch.Tensor) -> tuple:
        """What step `idx` reads from storage; runs in the reader's thread (prefetch > 0): reads only."""
        local = idx[rows].numpy()
        x, tok = images[local], tokens[local]
        if pinned:  # page-locked host copies, so the copies to the GPU below overlap the step (non_blocking)
            x, tok = pin(torch.from_numpy(np.ascontiguousarray(x))), pin(tok)
        return idx, x, tok, objective.fetch(idx)

    waited = 0.0
    t0 = time.perf_counter()
    with progress(total=total, initial=step, desc=desc, unit="step", disable=not main) as bar:
        while epoch < cfg.epochs:
            if order is None:
                order = epoch_order(cfg.shuffle, n, gen, seed, epoch, shard_of, cfg.shuffle_shards,
                                    cfg.shuffle_buffer, sample_weights)
            # sorted reads are kinder to memory-mapped shards; the order inside a batch does not matter
            batches = (order[p * batch : (p + 1) * batch].sort().values for p in range(pos, steps_per_epoch))
            # one reader per epoch: the next epoch's global order draws from `gen`, which the steps draw from too
            with BatchReader(gather, batches, cfg.prefetch) as reader:  # closed however the epoch ends
                while pos < steps_per_epoch:
                    t_step, w0 = time.perf_counter(), reader.wait_seconds
                    idx, x_host, tok_host, fetched = next(reader)
                    crops = draw_crops(batch, gen)[rows] if cfg.augment else None
                    x = to_tensor(x_host, spec, device, crops)
                    tok = tok_host.to(device, non_blocking=True)
                    if fetched is None:
                        objective.begin_step(idx)
                    else:
                        objective.begin_step(idx, fetched)
                    loss, parts = _backward(net, model, x, tok, idx, objective, cfg.accum_steps, world, use_bf16,
                                            device)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"{desc}: loss became {loss} at step {step}")
                    grad_norm = None
                    if cfg.grad_clip_norm:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                    objective.after_step()
                    step, pos = step + 1, pos + 1
                    history = {"loss": loss, **parts}
                    if main:
                        bar.set_postfix(loss=f"{loss:.3f}")
                        bar.update(1)
                    if log and main and (step % cfg.log_every == 0 or step == total):
                        took = time.perf_counter() - t_step
                        extra = {"lr": sched.get_last_lr()[0], "epoch": epoch, "samples_per_second": batch / took,
                                 "data_wait_fraction": (reader.wait_seconds - w0) / took}
                        if grad_norm is not None:
                            extra["grad_norm"] = grad_norm
                        log({**history, **extra}, step)
                    if step % 16 == 0 and hasattr(images, "release"):
                        images.release()  # memory-mapped views: keep RSS flat however large the corpus
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                        save()
            waited += reader.wait_seconds
            epoch, pos, order = epoch + 1, 0, None
    seconds = time.perf_counter() - t0
    save(complete=True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(False)
    model.eval()
    history = {**history, **objective.summary(), "steps": step, "train_seconds": seconds, "pairs": n,
               "global_batch": batch, "world_size": world,
               "samples_per_second": (step - (resumed_from or 0)) * batch / max(seconds, 1e-9),
               "data_wait_fraction": waited / max(seconds, 1e-9)}
    if resumed_from is not None:
        history["resumed_from_step"] = resumed_from
    return history


def _forward(net: torch.nn.Module, x, tok, use_bf16: bool, device: torch.device):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        img, txt, scale = net(x, tok)[:3]
    return img.float(), txt.float(), scale.float()


def _backward(net, model, x, tok, idx, objective: Objective, accum: int, world: int, use_bf16: bool,
              device: torch.device) -> tuple[float, dict]:
    """Gradients of the objective over the global batch, accumulated over `accum` micro-batches.

    With accumulation, every micro-batch's features are first computed without gradients; then each micro-batch
    is re-encoded with gradients and the loss is taken over the whole batch with the others' features fixed (a
    gradient cache, as open_clip's accum_freq does): the summed gradient equals the one-pass gradient exactly, so
    contrastive negatives are never reduced to a micro-batch. The logit scale takes its gradient in one pass only.
    The loss is scaled by the world size because DDP averages, and each rank holds the gradient of its rows only.
    """
    if accum == 1:
        img, txt, scale = _forward(net, x, tok, use_bf16, device)
        loss, parts = objective.loss(img, txt, scale, idx)
        (loss * world).backward()
        return loss.item(), parts
    chunks = list(zip(x.chunk(accum), tok.chunk(accum)))
    with torch.no_grad():
        cached = [_forward(model, xc, tc, use_bf16, device)[:2] for xc, tc in chunks]
    for j, (xc, tc) in enumerate(chunks):
        last = j == accum - 1
        sync = contextlib.nullcontext() if last or world == 1 else net.no_sync()
        with sync:
            img_j, txt_j, scale = _forward(net, xc, tc, use_bf16, device)
            img = torch.cat([img_j if k == j else c[0] for k, c in enumerate(cached)])
            txt = torch.cat([txt_j if k == j else c[1] for k, c in enumerate(cached)])
            loss, parts = objective.loss(img, txt, scale if last else scale.detach(), idx)
            (loss * world).backward()
    return loss.item(), parts


class Tokens:
    """Captions tokenised per batch when indexed: no [N, context] tensor for the whole corpus in memory. texts: any
    indexable sequence (a SplitTable's Captions reads each from the manifest: no corpus-sized list either)."""

    def __init__(self, tokenizer: Callable, texts: "Sequence[str]"):
        self.tokenizer, self.texts = tokenizer, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.tokenizer([self.texts[int(i)] for i in idx])


def tokenize_all(tokenizer: Callable, texts: "Sequence[str]") -> Tokens:
    return Tokens(tokenizer, texts)
