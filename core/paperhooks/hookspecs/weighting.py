"""Sample weighting: how much each sample of the batch counts in the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec
def weighting_sample_weights(
    losses: torch.Tensor, batch: Mapping[str, torch.Tensor], ctx: StepContext
) -> torch.Tensor | None:
    """Non-negative weights for this rank's samples.

    :param losses: this rank's per-sample losses, shape ``[B]``, detached. Per-token losses
        arrive already reduced to per-sample means over ``token_mask``.
    :param batch: this rank's batch (``input``, ``target``, ``index``, optional ``group``...).
    :param ctx: the step context; use ``ctx.dist`` for anything that needs the global batch.
    :return: weights of shape ``[B]``, or ``None`` to abstain.

    Several plugins: the weights multiply. The core then normalizes once over the global
    batch, so the loss is ``Σ_i w_i ℓ_i / Σ_j w_j`` with both sums over all ranks' samples.
    Called from ``HookedModule.training_step`` after the per-sample losses.
    """
