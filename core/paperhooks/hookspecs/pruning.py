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

    A pure function of progress (``ctx.step``/``ctx.epoch``). One owner.
    Called from ``on_train_batch_end`` after the optimizer step.
    """


@hookspec(firstresult=True)
def pruning_scores(params: Mapping[str, torch.Tensor], module: Any, ctx: StepContext) -> Mapping[str, torch.Tensor] | None:
    """Importance of each prunable weight (higher is kept). One owner; default ``|w|``.

    :param params: prunable parameter name → current (masked) weight tensor.
    """


@hookspec(firstresult=True)
def pruning_allocate(
    scores: Mapping[str, torch.Tensor], sparsity: float, ctx: StepContext
) -> Mapping[str, torch.Tensor] | None:
    """Boolean keep-masks reaching ``sparsity`` overall. One owner; default global top-k."""
