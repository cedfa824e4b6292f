"""Input perturbation: change the inputs before the forward pass (e.g. adversarial examples)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec
def perturb_inputs(
    batch: Mapping[str, torch.Tensor], module: Any, ctx: StepContext
) -> Mapping[str, torch.Tensor] | None:
    """Return a new batch with perturbed inputs, or ``None`` to leave it.

    Backward passes made here must run inside ``ctx.no_sync()``.
    Several plugins: chained in recipe order. Called first in ``training_step``.
    """
