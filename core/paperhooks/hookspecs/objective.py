"""Objectives: the per-sample terms that make up the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec
def objective_terms(
    module: Any,
    batch: Mapping[str, torch.Tensor],
    outputs: Mapping[str, torch.Tensor],
    ctx: StepContext,
) -> Mapping[str, torch.Tensor] | None:
    """Named per-sample loss terms, each of shape ``[B]``.

    :param module: the ``HookedModule`` (call it for extra forward passes).
    :param batch: this rank's batch.
    :param outputs: what ``module.outputs(batch)`` returned (computed once per step).
    :param ctx: the step context.
    :return: a mapping from objective name to per-sample values, or ``None``.

    Several plugins: terms add up by name, together with the module's own losses (named
    ``loss``) unless a plugin declares ``replaces_task_loss``. Called from
    ``HookedModule.training_step`` after ``module.outputs``.
    """
