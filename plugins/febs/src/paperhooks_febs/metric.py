"""The ``febs-metric`` plugin: FairSeg's equity-scaled performance as torchmetrics metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torchmetrics

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_febs import functional as F
from paperhooks_febs.plugin import PAPER

if TYPE_CHECKING:
    from paperhooks.context import StepContext

METRIC_PLUGIN = "febs-metric"


class GroupPerformance(torchmetrics.Metric):
    """Per-sample performance summed per identity group; reports ES or the worst group.

    ``update(outputs, batch)``: per-sample performance from ``outputs["logits"]`` and
    ``batch["target"]`` — ``accuracy`` (``[B, C]`` logits) or per-image ``dice`` over the
    foreground classes (``[B, C, *spatial]`` logits) — grouped by ``batch["group"]``. Group ids outside 0…G−1
    (e.g. −1, unknown) count towards the overall performance only, as in the official
    ``inference.py``. All states are sums (``dist_reduce_fx="sum"``), so the result over ranks
    is the result over the whole evaluation set.

    ``compute()``: ``equity_scaled`` (ES, :func:`~.functional.equity_scaled`) or ``worst``
    (min over groups of perf_a), over the groups that had samples.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        num_groups: int,
        perf: Literal["accuracy", "dice"] = "accuracy",
        statistic: Literal["equity_scaled", "worst"] = "equity_scaled",
        alpha: float = 1.0,
        spread: Literal["abs", "std"] = "abs",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_groups, self.perf, self.statistic = num_groups, perf, statistic
        self.alpha, self.spread = alpha, spread
        self.add_state("group_sum", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("group_count", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        logits, target = outputs["logits"].detach(), batch["target"]
        pred = logits.argmax(dim=1)
        if (logits.dim() == 2) != (self.perf == "accuracy"):
            raise ValueError(
                f"{METRIC_PLUGIN}: perf {self.perf!r} needs logits of shape "
                f"{'[B, C]' if self.perf == 'accuracy' else '[B, C, *spatial]'}, got {tuple(logits.shape)}"
            )
        if self.perf == "accuracy":
            perf = (pred == target).to(torch.float64)  # [B]
        else:
            perf = F.hard_dice_per_sample(pred, target, logits.shape[1])  # [B]
        group = batch.get("group")
        if group is None:
            raise ValueError(f"{METRIC_PLUGIN}: needs batch['group'] (identity groups)")
        group = group.long()
        known = (group >= 0) & (group < self.num_groups)
        self.group_sum += torch.zeros_like(self.group_sum).index_add(0, group[known], perf[known])
        self.group_count += torch.bincount(group[known], minlength=self.num_groups).to(torch.float64)
        self.total_sum += perf.sum()
        self.total_count += perf.numel()

    def compute(self) -> torch.Tensor:
        seen = self.group_count > 0
        if not bool(seen.any()):
            return torch.tensor(float("nan"), dtype=torch.float64)
        per_group = self.group_sum[seen] / self.group_count[seen]
        if self.statistic == "worst":
            return per_group.min()
        overall = self.total_sum / self.total_count
        return F.equity_scaled(overall, per_group, self.alpha, self.spread)


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
            raise ValueError(f"EquityScaledConfig.perf must be one of accuracy, dice, got {self.perf!r}")
        if self.spread not in ("abs", "std"):
            raise ValueError(f"EquityScaledConfig.spread must be one of abs, std, got {self.spread!r}")
        if not isinstance(self.worst_group, bool):
            raise ValueError(f"EquityScaledConfig.worst_group must be true or false, got {self.worst_group!r}")


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
        cfg = self.config
        suffix = "acc" if cfg.perf == "accuracy" else "dice"
        out: dict[str, torchmetrics.Metric] = {
            f"es_{suffix}": GroupPerformance(cfg.num_groups, cfg.perf, "equity_scaled", cfg.alpha, cfg.spread)
        }
        if cfg.worst_group:
            out[f"worst_group_{suffix}"] = GroupPerformance(cfg.num_groups, cfg.perf, "worst")
        return out


__all__ = ["EquityScaledConfig", "EquityScaledMetric", "GroupPerformance"]
