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
from collections.abc import Callable, Mapping, Sequence

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


# -- exact top-k over shards -------------------------------------------------------------------
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def order_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``int64`` keys ordered as the floats ``x`` are, and the number of key bits (32 or 64).

    The IEEE bit pattern read as a signed integer is monotone for non-negative floats; for
    negative ones the magnitude bits are flipped so the order reverses. ``-0.0`` counts as
    ``+0.0``, infinities are ordered, NaN is refused. Half and bfloat16 widen to float32
    exactly; float64 keeps all 64 bits.
    """
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if bool(torch.isnan(x).any()):
        raise ValueError("scores contain NaN; a top-k over them is undefined")
    if x.dtype == torch.float64:
        bits = (x.detach() + 0.0).contiguous().view(torch.int64)  # + 0.0 turns -0.0 into +0.0
        return torch.where(bits < 0, bits ^ _INT64_MAX, bits), 64
    bits = (x.detach().to(torch.float32) + 0.0).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFF_FFFF, bits), 32


@torch.no_grad()
def topk_mask(local: Sequence[torch.Tensor], k: int | Callable[[int], int]) -> list[torch.Tensor]:
    """Boolean masks keeping exactly the ``k`` largest of all ranks' scores together.

    ``k`` may be a function of the global number of scores (e.g. ``lambda n: n - round(s·n)``),
    which is known only after the first all-reduce.

    Every rank passes the same number of tensors: its part of each of the same tensors
    (FSDP2's rows of every weight). The global order is tensor by tensor, and inside a tensor
    rank 0's part first, then rank 1's..., each row-major: for parts that are consecutive
    row blocks (FSDP2's ``Shard(0)``) that is the row-major order of the whole tensors, so
    the result is what one process gets from a stable descending sort of the whole tensors
    concatenated, keeping the first ``k``: among equal scores the earlier element is kept.
    No score leaves its rank:

    1. one all-reduce of the element count (and whether any score is float64);
    2. bisection on the integer keys of :func:`order_keys` for the k-th largest key ``T``:
       32 rounds (64 for float64 scores) of one all-reduced ``int64`` count each;
    3. one all-gather of each rank's counts (``#key > T`` and ``#key == T`` per tensor);
       each rank keeps its elements above ``T`` and, of its ties, those whose place in the
       global order of ties is within the ``k - #(key > T)`` still to keep.

    On one process the collectives are identities and the same steps run locally.
    """
    device = local[0].device if len(local) else torch.device("cpu")
    wide = any(t.dtype == torch.float64 for t in local)
    n_local = sum(t.numel() for t in local)
    both = all_reduce_sum(torch.tensor([n_local, int(wide)], dtype=torch.int64, device=device))
    total, wide = int(both[0].item()), bool(both[1].item())  # float64 keys if any rank has float64
    if callable(k):
        k = k(total)
    keys, bits = [], 64 if wide else 32
    for t in local:
        key, _ = order_keys(t.to(torch.float64) if wide else t)
        keys.append(key)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"topk_mask: k must be an integer in [0, {total}], got {k!r}")
    if k == 0 or k == total:
        return [
            torch.full(key.shape, k == total, dtype=torch.bool, device=key.device) for key in keys
        ]
    # invariant: count(key >= lo) >= k > count(key >= hi)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        local_count = sum(
            ((key >= mid).sum() for key in keys), torch.zeros((), dtype=torch.int64, device=device)
        )
        if int(all_reduce_sum(local_count).item()) >= k:
            lo = mid
        else:
            hi = mid
    threshold = lo  # the k-th largest key: count(>= T) >= k > count(> T)
    above = sum(
        ((key > threshold).sum() for key in keys), torch.zeros((), dtype=torch.int64, device=device)
    )
    ties = [(key == threshold).sum() for key in keys]
    # [R, 1 + L]: per rank, #above and #ties of each tensor (the only thing that crosses ranks)
    counts, _ = all_gather_cat(torch.stack([above, *ties]).view(1, -1))
    if counts.shape[1] != 1 + len(keys):
        raise ValueError("topk_mask: every rank must pass the same number of tensors")
    need = k - int(counts[:, 0].sum().item())  # ties to keep over all ranks, >= 1
    tie_counts = counts[:, 1:]
    out = []
    for j, key in enumerate(keys):
        # ties before this rank's part of tensor j: all ties of tensors < j, then ranks < r in j
        before = int(tie_counts[:, :j].sum().item()) + int(tie_counts[: rank(), j].sum().item())
        take = need - before  # how many of this part's ties are kept (first in row-major order)
        eq = key == threshold
        order = torch.cumsum(eq.reshape(-1), 0).view_as(eq)
        out.append((key > threshold) | (eq & (order <= take)))
    return out


@torch.no_grad()
def sum_over_ranks(stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of ``stats`` summed over ranks, in one all-reduce (no gradient).

    For calibration statistics (activation norms, Fisher sums, counts...) that each rank
    accumulates over its share of the calibration batches: after this call every rank holds
    the statistics of all the batches. Tensors are flattened into one float64 buffer
    (integers up to 2^53 stay exact) and given back in their own shapes and dtypes.
    """
    items = list(stats.items())
    if not items or not is_distributed():
        return {k: v.detach().clone() for k, v in items}
    flat = torch.cat([v.detach().reshape(-1).to(torch.float64) for _, v in items])
    flat = all_reduce_sum(flat)
    out, offset = {}, 0
    for k, v in items:
        out[k] = flat[offset : offset + v.numel()].view(v.shape).to(v.dtype)
        offset += v.numel()
    return out


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
    "sum_over_ranks",
    "topk_mask",
    "order_keys",
    "world_size",
]
