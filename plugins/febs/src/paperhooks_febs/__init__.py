"""paperhooks plugins ``febs`` and ``febs-metric``: FairSeg's Fair Error-Bound Scaling (ICLR 2024)."""

from paperhooks_febs.functional import (
    SMOOTH,
    dice,
    equity_scaled,
    febs_dice,
    febs_value_and_grad,
    febs_weights,
    group_losses,
    group_sums,
    hard_dice_per_sample,
    per_sample_sums,
)
from paperhooks_febs.metric import EquityScaledConfig, EquityScaledMetric
from paperhooks_febs.plugin import FEBS, TERM, FEBSConfig


def __getattr__(name: str):  # noqa: ANN202
    """``GroupPerformance`` loads on first use: it subclasses ``torchmetrics.Metric``, and
    importing torchmetrics (and torchvision with it) is what listing plugins should not pay for."""
    if name == "GroupPerformance":
        from paperhooks_febs.group_performance import GroupPerformance

        return GroupPerformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FEBS",
    "SMOOTH",
    "TERM",
    "EquityScaledConfig",
    "EquityScaledMetric",
    "FEBSConfig",
    "GroupPerformance",
    "dice",
    "equity_scaled",
    "febs_dice",
    "febs_value_and_grad",
    "febs_weights",
    "group_losses",
    "group_sums",
    "hard_dice_per_sample",
    "per_sample_sums",
]
