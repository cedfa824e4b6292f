"""SaRA as pure torch: the sparse trainable set, its parametrization and the low-rank penalty.

Hu et al., "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse
Low-Rank Adaptation" (ICLR 2025, arXiv 2409.06633v2). For every parameter P of the
pre-trained model, in the paper's notation (θ_t is written ε here)::

    M      = 1[|P₀| < θ_t]                        Eq. 2: the "temporarily ineffective" entries
    ∇P_M   = ∇P ⊙ M                               Eq. 3: only M's entries are updated
    L_rank = ‖P_M‖_* = Σᵢ σᵢ(P ⊙ M)               Eqs. 4–5, weighted by λ_rank (App. K: 5e-3)
    at T:  keep training only the entries of M still below θ_t, freeze the rest   Sec. 4.3
    lr     = 1e-3 · exp(−350 θ_t)                 Eq. 12 (App. K, fitted on SD 1.5)

Here the update is a parametrization, P = M ⊙ V + (1 − M) ⊙ P₀ (:class:`SparseUpdate`), whose
gradient with respect to the stored V is ∂L/∂P ⊙ M, i.e. Eq. 3. The official optimizer
(``sjtuplayer/SaRA``, ``optim/adamw2.py``) instead runs AdamW on the whole tensors and writes
the unmasked entries back (``param·mask + ori·(1 − mask)``). Both give the same effective
weights: neither the gradient, nor the moments, nor the decoupled weight decay moves a frozen
entry, because the network reads frozen entries from the buffer P₀.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_rule(threshold: float) -> float:
    """The paper's learning rate for threshold ε (Eq. 12; the code's default): 1e-3 · exp(−350 ε),
    ≈ 4.97e-4 at ε = 2e-3."""
    return 1e-3 * math.exp(-350.0 * threshold)


def ineffective(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """M = |P| < ε, elementwise (Eq. 2; ``set_mask_param``); a bool tensor of P's shape."""
    return weight.detach().abs() < threshold


def quantile_threshold(tensors: list[torch.Tensor], fraction: float) -> float:
    """The ε for which |P| < ε holds for ⌊fraction · N⌋ of the N entries of ``tensors``.

    The (k+1)-th smallest |P| over all of them, k = ⌊fraction·N⌋: strictly below it lie
    exactly k entries (fewer on ties). How the absolute ε = 2e-3 of Stable Diffusion carries
    over to a model of another scale: on SD 1.5 it selects about 50M of the UNet's 860M
    parameters (≈ 6 %, App. L, Fig. 25), and zeroing the smallest 10 % (even 20 %) barely
    changes its outputs (Sec. 3.1).
    """
    flat = torch.cat([t.detach().abs().reshape(-1).double().cpu() for t in tensors])
    k = int(fraction * flat.numel())
    if k >= flat.numel():
        return math.inf
    return float(torch.kthvalue(flat, k + 1).values)


def nuclear_norm(matrix: torch.Tensor) -> torch.Tensor:
    """‖A‖_* = Σ σᵢ(A) (Eq. 4), differentiable: its gradient is the subgradient U Vᵀ the paper
    cites (``AdamW.nuclear_norm``: ``torch.svd(A).S.sum()``)."""
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
        """Progressive step (Sec. 4.3): keep training only the selected entries still below ε;
        freeze the rest at their current values (``update_mask``: new mask ⊙ old mask)."""
        self.frozen.copy_(current)
        self.mask &= ineffective(current, threshold)

    def extra_repr(self) -> str:
        return f"trainable={int(self.mask.sum())}/{self.mask.numel()}"


__all__ = ["SparseUpdate", "ineffective", "lr_rule", "nuclear_norm", "quantile_threshold"]
