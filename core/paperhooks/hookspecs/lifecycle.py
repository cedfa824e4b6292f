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
def lifecycle_step_end(module: Any, ctx: StepContext) -> None:
    """After each optimizer step, after reparam and pruning updates. Recipe order."""


@hookspec
def lifecycle_epoch_end(module: Any, ctx: StepContext) -> None:
    """At the end of each training epoch. Recipe order."""


@hookspec
def lifecycle_fit_end(module: Any, ctx: StepContext) -> None:
    """Once at the end of fit, before post-training transforms. Reverse recipe order."""
