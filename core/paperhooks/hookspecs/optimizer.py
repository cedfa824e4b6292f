"""The optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torch

    from paperhooks.context import StepContext


@hookspec(firstresult=True)
def optimizer_build(
    param_groups: list[dict[str, Any]], ctx: StepContext
) -> torch.optim.Optimizer | None:
    """Build the optimizer over ``param_groups`` (each has ``params``, ``lr``, ``weight_decay``).

    Exactly one owner: with no optimizer plugin the recipe's ``optimizer`` section builds a
    ``torch.optim`` optimizer. Called from ``HookedModule.configure_optimizers``.
    """
