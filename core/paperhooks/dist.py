"""Collectives that plugins call: each is a no-op (or the identity) on one process.

The rule of paperhooks: a run on N processes computes what one process computes on the
global batch. Plugins keep that rule by computing anything that depends on the batch from
global quantities, through these helpers; they never call ``torch.distributed`` themselves.

All helpers work on the default process group, which under ``ddp`` and under FSDP2 through
``ModelParallelStrategy`` (data parallel only) is the data-parallel group.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch
import torch.distributed as tdist

#: Bytes this process handed to each kind of collective through these helpers (payload
#: sizes, exact, counted only when a process group is running). Benchmarks read and reset it.
traffic: Counter[str] = Counter()


def _count(op: str, tensor: torch.Tensor) -> None:
    traffic[op] += tensor.numel() * tensor.element_size()


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
        _count("all_reduce", out)
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        _count("all_reduce", out)
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


@torch.no_grad()
def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        _count("all_reduce", out)
        tdist.all_reduce(out, op=tdist.ReduceOp.MIN)
    return out


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of all elements on all ranks (a 0-d tensor, no gradient)."""
    return all_reduce_sum(tensor.detach().sum())


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of all elements on all ranks, counting every element once (no gradient)."""
    both = torch.stack(
        [
            tensor.detach().sum().to(torch.float64),
            torch.tensor(tensor.numel(), dtype=torch.float64, device=tensor.device),
        ]
    )
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
    _count("all_gather", n)
    tdist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    longest = max(sizes_l)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes_l]
    _count("all_gather", padded)
    tdist.all_gather(parts, padded)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes_l, strict=True)])
    start = sum(sizes_l[: tdist.get_rank()])
    return out, slice(start, start + t.shape[0])


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` as rank ``src`` holds it, on every rank (in place; also returned)."""
    if is_distributed():
        _count("broadcast", tensor)
        tdist.broadcast(tensor, src=src)
    return tensor


_SCATTER_OK: bool | None = None
# torch 2.14 renamed reduce_scatter_tensor
_reduce_scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor


@torch.no_grad()
def reduce_scatter_columns(matrix: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum ``[K, P]`` over ranks, keeping on rank r only columns ``[r·c, (r+1)·c)``.

    ``c = ceil(P / R)``; the last rank's slice is padded with zero columns. Returns the local
    ``[K, c]`` block and ``c``. One reduce-scatter where the backend has it (NCCL, and gloo
    in recent torch); otherwise an all-reduce followed by slicing (same values, more bytes).
    """
    global _SCATTER_OK
    k, p = matrix.shape
    world, r = world_size(), rank()
    c = -(-p // world)
    padded = torch.zeros(world * c, k, dtype=matrix.dtype, device=matrix.device)
    padded[:p] = matrix.detach().T
    out = torch.empty(c, k, dtype=matrix.dtype, device=matrix.device)
    if _SCATTER_OK is not False:
        try:
            _reduce_scatter(out, padded, op=tdist.ReduceOp.SUM)
            _count("reduce_scatter", padded)
            _SCATTER_OK = True
            return out.T.contiguous(), c
        except (RuntimeError, NotImplementedError, ValueError):
            if _SCATTER_OK:
                raise
            _SCATTER_OK = False
    _count("all_reduce", padded)
    tdist.all_reduce(padded, op=tdist.ReduceOp.SUM)
    return padded[r * c : (r + 1) * c].T.contiguous(), c


@torch.no_grad()
def all_gather_columns(vector: torch.Tensor, c: int, p: int) -> torch.Tensor:
    """Inverse of the column split: every rank's ``[c]`` slice, concatenated and trimmed to ``[P]``."""
    parts = [torch.empty_like(vector) for _ in range(world_size())]
    _count("all_gather", vector)
    tdist.all_gather(parts, vector.contiguous())
    return torch.cat(parts)[:p]


def step_generator(
    seed: int, step: int, stream: str = "", device: torch.device | str = "cpu"
) -> torch.Generator:
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
    "all_gather_columns",
    "reduce_scatter_columns",
    "traffic",
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
