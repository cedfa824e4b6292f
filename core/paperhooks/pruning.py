"""Pruning masks as ``torch.nn.utils.parametrize`` parametrizations, with the core defaults.

The pruning family splits a method into schedule (``pruning_schedule``: how sparse, when),
criterion (``pruning_scores``: which weights matter; default ``|w|``) and allocation
(``pruning_allocate``: how the sparsity is spread; default one global threshold). Weights
are replicated under DDP, so scores and masks are computed identically on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """``W ↦ W ⊙ M`` with a boolean keep-mask ``M`` stored as a buffer (saved with the model)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is pruned: every Linear and Conv layer, by qualified name."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def add_masks(model: nn.Module) -> dict[str, Mask]:
    """Register a :class:`Mask` on every prunable weight (after any other parametrization)."""
    masks = {}
    for name, m in prunable(model).items():
        mask = Mask(m.weight.shape).to(m.weight.device)
        parametrize.register_parametrization(m, "weight", mask)
        masks[name] = mask
    return masks


def magnitude_scores(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: w.detach().abs() for k, w in params.items()}


def global_allocation(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep the ``(1 - sparsity)·N`` highest scores over all layers (ties: first in order)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = round((1.0 - sparsity) * flat.numel())
    order = torch.argsort(flat, descending=True, stable=True)
    keep_flat = torch.zeros_like(flat, dtype=torch.bool)
    keep_flat[order[:keep]] = True
    out, offset = {}, 0
    for k, s in scores.items():
        out[k] = keep_flat[offset : offset + s.numel()].view_as(s)
        offset += s.numel()
    return out


def sparsity_of(masks: Mapping[str, Mask]) -> float:
    total = sum(m.mask.numel() for m in masks.values())
    zeros = sum(int((~m.mask).sum()) for m in masks.values())
    return zeros / max(total, 1)
