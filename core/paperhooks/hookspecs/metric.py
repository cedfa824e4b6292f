"""Metrics, as torchmetrics metrics (reduced across ranks by torchmetrics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from paperhooks.hookspecs._marker import hookspec

if TYPE_CHECKING:
    import torchmetrics

    from paperhooks.context import StepContext


@hookspec
def metric_build(module: Any, ctx: StepContext) -> Mapping[str, torchmetrics.Metric] | None:
    """Metrics to compute on validation and test data.

    Each metric's ``update`` is called as ``metric.update(outputs, batch)``.
    Several plugins: union; two metrics with one name are refused. Called once at setup.
    """
