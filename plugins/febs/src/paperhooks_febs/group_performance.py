"""FairSeg's per-group performance as a torchmetrics metric (imported only when metrics are built).

Kept out of :mod:`paperhooks_febs.metric` so that loading the ``febs``/``febs-metric`` entry
points (listing plugins, validating recipes) does not import torchmetrics (and torchvision).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torchmetrics

from paperhooks_febs import functional as F
from paperhooks_febs.metric import METRIC_PLUGIN


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
        self.add_state(
            "group_sum", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "group_count", torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("total_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> None:
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
        self.group_count += torch.bincount(group[known], minlength=self.num_groups).to(
            torch.float64
        )
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


__all__ = ["GroupPerformance"]
