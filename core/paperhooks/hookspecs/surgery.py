"""Gradient surgery: from one gradient per objective to one update direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec
def surgery_combine(grads: torch.Tensor, names: Sequence[str], ctx: StepContext) -> torch.Tensor | None:
    """Turn the matrix of per-objective gradients into a direction or a modified set.

    :param grads: ``G`` of shape ``[K, P]``: row k is the gradient of objective k over all
        trainable parameters, flattened, already averaged over ranks (identical on all ranks).
    :param names: the K objective names, in row order.
    :param ctx: the step context.
    :return: a modified set ``[K, P]``, a direction ``[P]``, or ``None`` (unchanged).

    Several plugins: chained in recipe order; each receives the previous result while it is
    still a set ``[K, P]``; once one returns a direction the chain stops. A set left at the end
    is summed over k. Turning this family on switches the module to manual optimization.
    Called from ``HookedModule.training_step`` after the per-objective gradients exist.
    """
