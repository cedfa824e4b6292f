"""Weight reparameterization through ``torch.nn.utils.parametrize``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    from paperhooks.context import StepContext


@hookspec
def reparam_setup(module: Any, ctx: StepContext) -> None:
    """Register parametrizations on ``module.model``'s weights.

    :param module: the ``HookedModule``; the network is ``module.model``.
    :param ctx: the step context.

    Several plugins: called in recipe order, so parametrizations stack in recipe order.
    Called once from ``HookedModule.configure_model``, before sharding and before the
    optimizer is built.
    """


@hookspec
def reparam_after_step(module: Any, ctx: StepContext) -> None:
    """Update a parametrization after an optimizer step (e.g. re-estimate a statistic).

    Several plugins: recipe order. Called from ``on_train_batch_end``.
    """


@hookspec
def reparam_merge(model: Any) -> None:
    """Undo a wrapper module (if the plugin used one instead of a parametrization).

    :param model: the network (``module.model``), changed in place.

    Several plugins: reverse recipe order. Called by :func:`paperhooks.reparam.merge` (and so
    by ``paperhooks export``) before every parametrization is folded into a plain weight;
    plugins that only register parametrizations need not implement it.
    """
