"""The ``febs-metric`` plugin: FairSeg's equity-scaled performance as torchmetrics metrics.

The metric class, :class:`~paperhooks_febs.group_performance.GroupPerformance`, is imported
inside :meth:`EquityScaledMetric.metric_build` (and on first access of ``GroupPerformance``
here), so loading the plugin does not import torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_febs.plugin import PAPER

if TYPE_CHECKING:
    import torchmetrics

    from paperhooks.context import StepContext

METRIC_PLUGIN = "febs-metric"


@dataclass(frozen=True)
class EquityScaledConfig:
    """The metric's settings; defaults from the official ``equity_scaled_perf``.

    :ivar num_groups: G; ids outside 0…G−1 count towards overall performance only.
    :ivar perf: the per-sample performance: ``accuracy`` (classification) or ``dice``
        (segmentation: per-image Dice of the predicted label map, foreground classes).
    :ivar alpha: α of ES = overall / (1 + α·Δ) (1.0 in the code).
    :ivar spread: Δ: ``abs`` = Σ_a |perf_a − overall| (``equity_scaled_perf``) or ``std`` =
        the sample standard deviation of perf_a (``equity_scaled_std_perf``).
    :ivar worst_group: also report the worst group's performance.
    """

    num_groups: int = 2
    perf: Literal["accuracy", "dice"] = "accuracy"
    alpha: float = 1.0
    spread: Literal["abs", "std"] = "abs"
    worst_group: bool = True

    def __post_init__(self) -> None:
        g = self.num_groups
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"EquityScaledConfig.num_groups must be an integer >= 1, got {g!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0:
            raise ValueError(f"EquityScaledConfig.alpha must be a finite number >= 0, got {a!r}")
        if self.perf not in ("accuracy", "dice"):
            raise ValueError(
                f"EquityScaledConfig.perf must be one of accuracy, dice, got {self.perf!r}"
            )
        if self.spread not in ("abs", "std"):
            raise ValueError(
                f"EquityScaledConfig.spread must be one of abs, std, got {self.spread!r}"
            )
        if not isinstance(self.worst_group, bool):
            raise ValueError(
                f"EquityScaledConfig.worst_group must be true or false, got {self.worst_group!r}"
            )


class EquityScaledMetric(Plugin):
    """FairSeg's equity-scaled performance (ES-Acc or ES-Dice) on validation data.

    Adds ``es_acc`` (``es_dice`` with ``perf: dice``) and, unless ``worst_group`` is off,
    ``worst_group_acc`` (``worst_group_dice``), logged as ``val/<name>``. Works with or without
    the ``febs`` loss (the paper reports ES for every method it compares).
    """

    Config = EquityScaledConfig
    name = METRIC_PLUGIN
    family: ClassVar[str] = "metric"
    paper: ClassVar[Paper] = PAPER
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: EquityScaledConfig

    @hookimpl
    def metric_build(self, module: Any, ctx: StepContext) -> dict[str, torchmetrics.Metric]:
        from paperhooks_febs.group_performance import GroupPerformance

        cfg = self.config
        suffix = "acc" if cfg.perf == "accuracy" else "dice"
        out: dict[str, torchmetrics.Metric] = {
            f"es_{suffix}": GroupPerformance(
                cfg.num_groups, cfg.perf, "equity_scaled", cfg.alpha, cfg.spread
            )
        }
        if cfg.worst_group:
            out[f"worst_group_{suffix}"] = GroupPerformance(cfg.num_groups, cfg.perf, "worst")
        return out


def __getattr__(name: str):  # noqa: ANN202
    """``GroupPerformance`` loads on first use (it imports torchmetrics, which listing plugins
    should not pay for)."""
    if name == "GroupPerformance":
        from paperhooks_febs.group_performance import GroupPerformance

        return GroupPerformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EquityScaledConfig", "EquityScaledMetric"]
