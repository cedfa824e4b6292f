"""Lifecycle hooks any plugin may implement next to its family's hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    from paperhooks.context import StepContext


@hookspec
def lifecycle_setup(module: Any, ctx: StepContext) -> None:
    """Once, when the module is set up for fit, after ``reparam_setup``. Recipe order."""


@hookspec
def lifecycle_before_optimizer_step(module: Any, ctx: StepContext) -> None:
    """After backward, before gradient clipping and the optimizer step. Recipe order.

    The gradients in ``p.grad`` are final: averaged over ranks under DDP (and, for
    plugin-added modules, under FSDP2), combined by gradient surgery under manual
    optimization. The weights are those the step's forward pass used. A plugin may read
    the gradients here, or change them in place (the optimizer then steps with the changed
    gradients, on every rank alike).
    """


@hookspec
def lifecycle_step_end(module: Any, ctx: StepContext) -> None:
    """After each optimizer step, after reparam and pruning updates. Recipe order."""


@hookspec
def lifecycle_epoch_end(module: Any, ctx: StepContext) -> None:
    """At the end of each training epoch. Recipe order."""


@hookspec
def lifecycle_fit_end(module: Any, ctx: StepContext) -> None:
    """Once at the end of fit, before post-training transforms. Reverse recipe order."""
