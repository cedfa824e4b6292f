"""R, R*, R̃ and R̃* as torchmetrics count metrics (Chen et al., Def. 2.3 and Cor. 3.3).

Kept out of :mod:`paperhooks_ranking_accuracy.plugin` because it subclasses
``torchmetrics.Metric``: only :meth:`~paperhooks_ranking_accuracy.plugin.RankingAccuracy.metric_build`
(and the package's lazy ``PairCountMetric``) import it, so loading the plugin does not import
torchmetrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchmetrics

from paperhooks_ranking_accuracy import functional as F
from paperhooks_ranking_accuracy.plugin import KINDS, NAME


class PairCountMetric(torchmetrics.Metric):
    """One of R, R*, R̃, R̃* as ``correct / total`` over every pair seen on every rank.

    ``update(outputs, batch)`` reads :meth:`~paperhooks.preference.PreferenceModule.outputs`
    (``chosen_logps``/``rejected_logps`` summed over response tokens only, the response masks,
    and ``ref_chosen_logps``/``ref_rejected_logps``). Both states are int64 counts with
    ``dist_reduce_fx="sum"``: the value over N ranks is the value over the whole evaluation set.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        kind: str,
        beta: float,
        alpha: float = 1.0,
        eps: float = 1e-3,
        alpha_key: str | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"{NAME}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.beta, self.alpha, self.eps, self.alpha_key = (
            kind,
            beta,
            alpha,
            eps,
            alpha_key,
        )
        self.add_state("correct", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> None:
        ideal = self.kind.startswith("idealized")
        prefix = "ref_" if ideal else ""
        win, lose = (
            outputs[f"{prefix}chosen_logps"].detach(),
            outputs[f"{prefix}rejected_logps"].detach(),
        )
        if self.kind.endswith("_ln"):
            win = F.length_normalize(win, outputs["chosen_mask"])
            lose = F.length_normalize(lose, outputs["rejected_mask"])
        if ideal:
            alpha: torch.Tensor | float = self.alpha
            if self.alpha_key is not None:
                if self.alpha_key not in batch:
                    raise ValueError(
                        f"{NAME}: alpha_key {self.alpha_key!r} is not in the batch (keys: {sorted(batch)})"
                    )
                alpha = batch[self.alpha_key].to(torch.float64)
            c = F.idealized_correct(win, lose, alpha, self.beta, self.eps)
        else:
            c = F.ranking_correct(win, lose)
        self.correct += c.sum()
        self.total += c.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.total.clamp_min(1)


__all__ = ["PairCountMetric"]
