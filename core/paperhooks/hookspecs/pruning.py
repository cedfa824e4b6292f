"""Pruning, split in schedule (when, how much), criterion (which weights), allocation (where)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec(firstresult=True)
def pruning_schedule(ctx: StepContext) -> float | None:
    """The sparsity (fraction of prunable weights set to zero) to reach now, or ``None``.

    A pure function of progress (``ctx.step``/``ctx.epoch``) in [0, 1). One owner.
    Called after every optimizer step with ``ctx.step`` = the steps done, and once before
    the first step of a fresh fit with ``ctx.step = 0``. Masks change only when the value
    differs from the current sparsity; pruned weights stay pruned.
    """


@hookspec(firstresult=True)
def pruning_scores(
    params: Mapping[str, torch.Tensor], module: Any, ctx: StepContext
) -> Mapping[str, torch.Tensor] | None:
    """Importance of each prunable weight (higher is kept). One owner; default ``|w|``.

    :param params: prunable layer name → current (masked) weight tensor; under FSDP2, this
        rank's rows of it (an element-wise criterion works unchanged; one that needs whole
        tensors or calibration statistics reduces them with ``ctx.dist``, e.g.
        ``dist.sum_over_ranks``).
    """


@hookspec(firstresult=True)
def pruning_allocate(
    scores: Mapping[str, torch.Tensor], sparsity: float, ctx: StepContext
) -> Mapping[str, torch.Tensor] | None:
    """Boolean keep-masks reaching ``sparsity`` overall. One owner; default global top-k.

    ``scores`` of entries already pruned are ``-inf``. Under FSDP2
    (``pruning.sharded_run(ctx)``) each rank holds its rows of every score tensor and returns
    masks of those rows; selecting over all ranks is ``dist.topk_mask`` (see
    ``pruning.global_allocation(..., sharded=True)``), never a gather of the scores.
    """
