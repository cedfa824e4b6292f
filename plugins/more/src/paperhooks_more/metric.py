"""The reward model's expected calibration error (ECE), as the paper reports it.

The official ``compute_metrics`` (``trainer_utils.py``) scores every ranked pair in both
orders: σ(r_i − r_j) with label 1 (i is preferred) and σ(r_j − r_i) = 1 − σ(r_i − r_j) with
label 0. ``calibration_error`` (``utils.py``) bins these probabilities into ``n_bins``
equal-width bins of [0, 1] and returns ECE = Σ_b |Σ_{k∈b} p_k − Σ_{k∈b} y_k| / n, i.e.
Σ_b (n_b/n)·|mean p − mean y| per bin, for 5, 10 and 20 bins.

torchmetrics' :class:`~torchmetrics.classification.BinaryCalibrationError` (``norm="l1"``)
computes exactly that sum from (probability, label) pairs, and under DDP it gathers the
pairs of every rank before binning, so N processes report what one process reports.
Binning: torchmetrics puts p in [e_k, e_{k+1}) (``bucketize(right=True)``), the official
code in (e_k, e_{k+1}] (``searchsorted`` on the inner edges); they differ only for a
probability lying exactly on an inner edge.

This module imports torchmetrics (and torchvision with it), so only
:meth:`~paperhooks_more.plugin.More.metric_build` and the package's lazy
``PreferenceCalibrationError`` import it; loading the plugin does not. The batch helper
:func:`~paperhooks_more.functional.batch_rewards_and_scores` lives in :mod:`.functional`
(re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchmetrics.classification import BinaryCalibrationError

from paperhooks_more import functional as F
from paperhooks_more.functional import batch_rewards_and_scores


class PreferenceCalibrationError(BinaryCalibrationError):
    """ECE of P(i ≻ j) = σ(r_i − r_j) over all ranked pairs, both orders, ``n_bins`` bins.

    ``update(outputs, batch)`` takes what the paperhooks metric hook hands it.
    """

    def update(  # type: ignore[override]
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> None:
        rewards, scores = batch_rewards_and_scores(outputs, batch)
        p = F.pair_probabilities(rewards.detach().float(), scores)  # [P]
        preds = torch.cat([p, 1 - p])
        labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)]).long()
        super().update(preds, labels)


__all__ = ["PreferenceCalibrationError", "batch_rewards_and_scores"]
