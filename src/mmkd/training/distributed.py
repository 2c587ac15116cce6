"""Owns torch.distributed for training: setup from torchrun's environment, global-batch gathers, the local shard.

One entry point serves both cases: a plain process is world size 1 (every helper is then the identity), and the
same step under `torchrun --nproc_per_node N` joins a process group (gloo on CPU, NCCL on CUDA). Each rank takes
an equal slice of every global batch; losses see the global batch through `gather_batch`, whose result keeps
the gradient of the local slice only, so the training loop multiplies the loss by the world size before DDP
averages the gradients: the update is then the single-process update on the same global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 alone writes checkpoints, logs to MLflow and shows progress."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once; returns the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def local_slice(global_batch: int) -> slice:
    """This rank's rows of a global batch; the batch must split evenly so every rank does the same work."""
    w = world_size()
    if global_batch % w:
        raise ValueError(f"global batch {global_batch} does not split evenly over {w} processes; "
                         "choose a batch_size divisible by the number of processes")
    per = global_batch // w
    return slice(rank() * per, (rank() + 1) * per)


def gather_batch(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of t, in rank order (= global batch order); only this rank's rows carry a gradient."""
    w = world_size()
    if w == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(w)]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank()] = t
    return torch.cat(parts)


class _ReplicatedGrad(torch.autograd.Function):
    """Identity whose gradient is divided by the world size (see `replicated`)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad / world_size()


def replicated(t: torch.Tensor) -> torch.Tensor:
    """For a scalar that every rank applies to the whole gathered batch (the logit scale, the ICL temperature):
    each rank's backward already holds its full gradient, and the loop multiplies the loss by the world size
    (for the features, whose gradient each rank holds for its own rows only). Dividing here keeps the gradient
    of such a scalar exact. The identity on a single process."""
    return t if world_size() == 1 else _ReplicatedGrad.apply(t)


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (e.g. the resume decision)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
