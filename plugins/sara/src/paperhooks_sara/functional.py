"""SaRA as pure torch: the sparse trainable set, its parametrization and the low-rank penalty.

Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse
Low-Rank Adaptation" (ICLR 2025, arXiv 2409.06633). For every parameter P of the
pre-trained model::

    M      = 1[|P₀| < ε]                          the "temporarily ineffective" entries (ε = 2e-3)
    P      = M ⊙ P_train + (1 − M) ⊙ P₀            only M's entries are fine-tuned
    L      = L_task + λ_rank · ‖P_l ⊙ M_l‖_*       one random 2-D weight l per step (λ_rank = 5e-4)
    at T:  M ← M ⊙ 1[|P_T| < ε],  P₀ ← P_T         progressive re-selection (T = progressive_iter)
    lr     = 1e-3 · exp(−350 ε)                    the code's default learning rate

The official optimizer (``sjtuplayer/SaRA``, ``optim/adamw2.py``) runs AdamW on the whole
tensors and then writes the unmasked entries back (``param·mask + ori·(1 − mask)``), so
neither the gradient, nor the moments, nor the decoupled weight decay moves a frozen entry.
:class:`SparseUpdate` gets the same effective weights as a parametrization: the frozen
entries are read from the buffer P₀, so whatever the optimizer does to the stored tensor
there is never seen by the network.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_rule(threshold: float) -> float:
    """The code's default learning rate for threshold ε: 1e-3 · exp(−350 ε) (≈ 4.97e-4 at 2e-3)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def ineffective(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """M = |P| < ε, elementwise (``set_mask_param``); a bool tensor of P's shape."""
    return weight.detach().abs() < threshold


def quantile_threshold(tensors: list[torch.Tensor], fraction: float) -> float:
    """The ε for which |P| < ε holds for ⌊fraction · N⌋ of the N entries of ``tensors``.

    The (k+1)-th smallest |P| over all of them, k = ⌊fraction·N⌋: strictly below it lie
    exactly k entries (fewer on ties). How the absolute ε = 2e-3 of Stable Diffusion
    (10–20 % of its weights, per the paper) carries over to a model of another scale.
    """
    flat = torch.cat([t.detach().abs().reshape(-1).double().cpu() for t in tensors])
    k = int(fraction * flat.numel())
    if k >= flat.numel():
        return math.inf
    return float(torch.kthvalue(flat, k + 1).values)


def nuclear_norm(matrix: torch.Tensor) -> torch.Tensor:
    """‖A‖_* = Σ σᵢ(A), differentiable (``AdamW.nuclear_norm``: ``torch.svd(A).S.sum()``)."""
    return torch.linalg.svdvals(matrix).sum()


class SparseUpdate(nn.Module):
    """The parametrization P = M ⊙ V + (1 − M) ⊙ P₀ of one tensor.

    V is the stored tensor (the layer's own parameter, unchanged at registration:
    ``right_inverse`` is the identity); M (``mask``) and P₀ (``frozen``) are persistent
    buffers, so a checkpoint restores the trainable set and the frozen values. The
    gradient reaching V is ∂L/∂P ⊙ M.
    """

    def __init__(self, weight: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.register_buffer("mask", ineffective(weight, threshold))
        self.register_buffer("frozen", weight.detach().clone())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, v, self.frozen)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    @torch.no_grad()
    def reselect(self, current: torch.Tensor, threshold: float) -> None:
        """Progressive step: keep training only the selected entries still below ε; freeze the
        rest at their current values (``update_mask``: new mask ⊙ old mask)."""
        self.frozen.copy_(current)
        self.mask &= ineffective(current, threshold)

    def extra_repr(self) -> str:
        return f"trainable={int(self.mask.sum())}/{self.mask.numel()}"


__all__ = ["SparseUpdate", "ineffective", "lr_rule", "nuclear_norm", "quantile_threshold"]
