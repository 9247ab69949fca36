"""torch.distributed helpers: set-up from torchrun's environment, gathers (with and without
gradient), and reductions. With one process every helper is the identity."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, no gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's use of this rank's rows, summed: reduce-scatter on NCCL, all-reduce elsewhere (gloo).
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.batch, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.batch
        return grad[start:start + ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...); gradients flow back to the owning rank."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; no gradient)."""
    if not is_distributed():
        return x.detach().clone()
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def all_reduce_max_int(value: int, device: torch.device) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def global_mean(local_mean: torch.Tensor, count: int, device: torch.device, world: int) -> torch.Tensor:
    """Turn a mean over this rank's ``count`` items into this rank's share of the mean over all
    ranks' items (DDP averages gradients over ranks, hence the factor ``world``)."""
    if world == 1:
        return local_mean
    total = all_reduce_sum(torch.tensor(float(count), device=device))
    if total.item() == 0:
        return local_mean * 0.0
    return local_mean * (count * world / total)


def gather_objects(items: list) -> list:
    """Concatenate every rank's list of picklable objects (rank order); the list itself without DDP."""
    if not is_distributed():
        return list(items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def step_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """A random stream that depends only on (seed, step, micro-batch): identical on every rank."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 97 + micro)
