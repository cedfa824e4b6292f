"""The official FEBS loss, re-typed from FairSeg's code, for the tests to compare against."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch


def _official_febs_loss(
    logits: torch.Tensor, target: torch.Tensor, attr: np.ndarray, n_attr: int, gamma: float
) -> torch.Tensor:
    """``febs_loss.forward(softmax=True)`` of FairSeg's TransUNet/utils.py, re-typed step by step."""
    n_classes, smooth = logits.shape[1], 1e-5
    inputs = torch.softmax(logits, dim=1)
    onehot = torch.stack([(target == i).float() for i in range(n_classes)], dim=1)

    def dice_loss(score, t):
        return 1 - (2 * torch.sum(score * t) + smooth) / (
            torch.sum(score * score) + torch.sum(t * t) + smooth
        )

    tmp = np.zeros(n_attr)
    for x in np.unique(attr):
        sel = torch.as_tensor(attr == x)
        tmp[x] = sum(
            dice_loss(inputs[sel][:, i], onehot[sel][:, i]).item() for i in range(n_classes)
        )
    w = torch.tanh(torch.tensor((np.min(tmp) / tmp) ** gamma))  # numpy: no gradient through w
    scale = w[torch.as_tensor(attr)].float()[:, None, None]
    return sum(dice_loss(inputs[:, i] * scale, onehot[:, i]) for i in range(n_classes)) / n_classes


@pytest.fixture
def official_febs_loss() -> Callable[..., torch.Tensor]:
    return _official_febs_loss
