"""Sample weighting: how much each sample of the batch counts in the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec
def weighting_sample_weights(
    losses: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
    module: Any,
    ctx: StepContext,
) -> torch.Tensor | None:
    """Non-negative weights for this rank's samples.

    :param losses: this rank's per-sample losses, shape ``[B]``, detached. Per-token losses
        arrive already reduced to per-sample means over ``token_mask``.
    :param batch: this rank's batch (``input``, ``target``, ``index``, optional ``group``...).
    :param outputs: what ``module.outputs(batch)`` returned this step.
    :param module: the ``HookedModule`` (e.g. for a second forward pass of the same samples).
    :param ctx: the step context; use ``ctx.dist`` for anything that needs the global batch.
    :return: weights of shape ``[B]``, or ``None`` to abstain.

    An implementation may take any subset of these arguments (pluggy passes what it names).

    Several plugins: the weights multiply. The core then normalizes once over the global
    batch, so the loss is ``Σ_i w_i ℓ_i / Σ_j w_j`` with both sums over all ranks' samples.
    Called from ``HookedModule.training_step`` after the per-sample losses.
    """
