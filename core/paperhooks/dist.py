"""Collectives that plugins call: each is a no-op (or the identity) on one process.

The rule of paperhooks: a run on N processes computes what one process computes on the
global batch. Plugins keep that rule by computing anything that depends on the batch from
global quantities, through these helpers; they never call ``torch.distributed`` themselves.

All helpers work on the default process group, which under ``ddp`` and under FSDP2 through
``ModelParallelStrategy`` (data parallel only) is the data-parallel group.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as tdist


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return tdist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left alone; no gradient)."""
    out = tensor.detach().clone()
    if is_distributed():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


@torch.no_grad()
def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        tdist.all_reduce(out, op=tdist.ReduceOp.MIN)
    return out


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of all elements on all ranks (a 0-d tensor, no gradient)."""
    return all_reduce_sum(tensor.detach().sum())


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of all elements on all ranks, counting every element once (no gradient)."""
    both = torch.stack([tensor.detach().sum().to(torch.float64), torch.tensor(tensor.numel(), dtype=torch.float64, device=tensor.device)])
    both = all_reduce_sum(both)
    return (both[0] / both[1]).to(tensor.dtype if tensor.is_floating_point() else torch.float64)


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Concatenate ``tensor`` along dim 0 over ranks, in rank order, without gradient.

    Ranks may hold different numbers of rows. Returns the global tensor and the slice of it
    that is this rank's rows, so ``global[local_slice]`` equals the input.
    """
    t = tensor.detach()
    if not is_distributed():
        return t.clone(), slice(0, t.shape[0])
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    longest = max(sizes_l)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes_l]
    tdist.all_gather(parts, padded)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes_l, strict=True)])
    start = sum(sizes_l[: tdist.get_rank()])
    return out, slice(start, start + t.shape[0])


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank (in place; also returned)."""
    if is_distributed():
        tdist.broadcast(tensor, src=src)
    return tensor


def step_generator(seed: int, step: int, stream: str = "", device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, stream): identical on every rank, and on resume.

    Plugins draw any randomness that must agree across ranks (a random mask, a random
    subspace, a hash seed) from it; ``stream`` separates the draws of different plugins.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{stream}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


__all__ = [
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "broadcast",
    "global_mean",
    "global_sum",
    "is_distributed",
    "rank",
    "step_generator",
    "world_size",
]
