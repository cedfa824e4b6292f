"""PST as pure torch: the importance score S and its straight-through parametrization.

Li et al., "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning" (IJCAI 2022,
arXiv 2205.11005). Notation of the paper / of the official code (alibaba/AliceMind
``S4/PST/pst/sparse.py``, class ``SparseLinear``; ``S4/PST/pst/utils.py``)::

    W' = W + β·U V                          W frozen; U [n, r_w] ~ N(0, 1), V [r_w, k] = 0
    S  = |W'| + α₁·A B + α₂·(R 1ᵀ + 1 Cᵀ)    A [n, r_m] ~ N(0, 1), B [r_m, k] = 0, R [n] = C [k] = 0
    M  = Top_v(S)                           the (1 − s) fraction of largest S kept (per layer)
    y  = x (M ⊙ W')ᵀ + b                    ∂L/∂S = ∂L/∂M (straight-through binarizer)

|W'| is the data-free importance; A B (low-rank) and R, C (structured: one score per row and
per column) approximate the data-driven importance. Only U, V, A, B, R, C are trained.
Defaults: r_w = r_m = 8, β = α₁ = α₂ = 1 (``weight_rank``, ``mask_rank``, ``weight_beta``,
``mask_alpha1``, ``mask_alpha2`` of ``NLU/run_glue.py``).

In paperhooks the binary mask M is the core's pruning mask (the last parametrization of the
weight); :class:`PstWeight`, registered before it, returns ``W' + (S − sg(S)) ⊙ W'``, whose
value is exactly W' (``S − sg(S)`` is exactly 0) and whose gradient reaches S as
``∂L/∂M = ∂L/∂(M ⊙ W') ⊙ W'`` — the straight-through estimator of ``SparseBinarizer``.
"""

from __future__ import annotations

import torch
from torch import nn


def pst_scores(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    alpha1: float = 1.0,
    alpha2: float = 1.0,
) -> torch.Tensor:
    """S = |W'| + α₁·A B + α₂·(R 1ᵀ + 1 Cᵀ), of W's shape [n, k].

    :param weight: W' = W + β U V, [n, k].
    :param A: [n, r_m]; ``B``: [r_m, k]; ``R``: [n] (rows); ``C``: [k] (columns).
    """
    return weight.abs() + alpha1 * (A @ B) + alpha2 * (R.unsqueeze(1) + C.unsqueeze(0))


class PstWeight(nn.Module):
    """The PST parametrization of one Linear weight: ``W ↦ W' + (S − sg(S)) ⊙ W'``.

    Holds the trainable U, V (weight update, rank ``weight_rank``) and A, B, R, C (scores,
    rank ``mask_rank``). The value is W' = W + β U V; the core's mask multiplies it next.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        weight_rank: int = 8,
        weight_beta: float = 1.0,
        mask_rank: int = 8,
        alpha1: float = 1.0,
        alpha2: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.weight_beta, self.alpha1, self.alpha2 = weight_beta, alpha1, alpha2
        self.U = nn.Parameter(torch.randn(out_features, weight_rank, generator=generator))
        self.V = nn.Parameter(torch.zeros(weight_rank, in_features))
        self.A = nn.Parameter(torch.randn(out_features, mask_rank, generator=generator))
        self.B = nn.Parameter(torch.zeros(mask_rank, in_features))
        self.R = nn.Parameter(torch.zeros(out_features))
        self.C = nn.Parameter(torch.zeros(in_features))

    def updated(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W + β U V."""
        return w + self.weight_beta * (self.U @ self.V)

    def learned(self) -> torch.Tensor:
        """The data-driven part of S: α₁ A B + α₂ (R 1ᵀ + 1 Cᵀ)."""
        return pst_scores(
            torch.zeros((), dtype=self.A.dtype, device=self.A.device),
            self.A,
            self.B,
            self.R,
            self.C,
            self.alpha1,
            self.alpha2,
        )

    def scores(self, w: torch.Tensor) -> torch.Tensor:
        """S of the stored weight ``w`` (W' formed here)."""
        return pst_scores(self.updated(w), self.A, self.B, self.R, self.C, self.alpha1, self.alpha2)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wp = self.updated(w)
        s = pst_scores(wp, self.A, self.B, self.R, self.C, self.alpha1, self.alpha2)
        return wp + (s - s.detach()) * wp


def cubic_bounds(total_steps: int, initial_warmup: float, final_warmup: float) -> tuple[int, int]:
    """(t_0, t_end) of PST's cubic schedule over ``total_steps`` optimizer steps T.

    ``schedule_sparsity_ratio`` (``pst/utils.py``) holds s_i until step t_w·T, ramps along
    s_f + (s_i − s_f)(1 − (t − t_w T)/(T − (t_w + t_f) T))³, and holds s_f after T − t_f·T:
    Zhu & Gupta's equation (1) with t_0 = t_w·T, nΔt = T − (t_w + t_f)·T and Δt = 1. The
    bounds are rounded to whole steps (exact when t_w·T and t_f·T are integers).
    """
    begin = round(initial_warmup * total_steps)
    end = round(total_steps - final_warmup * total_steps)
    return begin, max(end, begin + 1)


__all__ = ["PstWeight", "cubic_bounds", "pst_scores"]
