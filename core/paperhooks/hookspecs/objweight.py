"""Objective weighting: the coefficient of each named objective."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec(firstresult=True)
def objweight_coefficients(
    objectives: Mapping[str, torch.Tensor], ctx: StepContext
) -> Mapping[str, torch.Tensor | float] | None:
    """Coefficients of the named scalar objectives (the loss is ``Σ_k c_k L_k``).

    :param objectives: name → scalar objective (already reduced over the global batch).
    :param ctx: the step context.
    :return: name → coefficient; names left out keep coefficient 1.

    One owner: a recipe with two plugins implementing this hook is refused before training.
    Called from ``HookedModule.training_step`` before backward.
    """
