"""Post-training transforms: quantize, merge, average... once after fit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    from paperhooks.context import StepContext


@hookspec
def transform_after_fit(module: Any, datamodule: Any, ctx: StepContext) -> None:
    """Transform ``module.model`` in place after training.

    Must compute the same result on every rank (or compute on rank 0 and ``ctx.dist.broadcast``).
    Several plugins: chained in recipe order. Called from ``on_fit_end``.
    """
