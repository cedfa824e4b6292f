"""D-Pruner's formulas as pure torch: general importance G, refined gradient g̃, dual importance S.

Zhang et al., "Pruning as a Domain-specific LLM Extractor" (Findings of NAACL 2024, arXiv
2405.06275). The formulas follow the authors' released code (preserved in the fork
``compressionOrg/D-Pruner`` @b3d5a7e; the official ``psunlpgroup/D-Pruner`` now holds only a
README): ``code/general.py`` (G, adapted from SparseGPT) and ``code/src/lomo.py`` (g̃, S).

- General importance, per Linear layer with inputs X from the general calibration set::

      H = (2/n) Σ x xᵀ,   H ← H + δ·mean(diag H)·I   (δ = percdamp = 0.01)
      U = chol(H⁻¹) (upper),   G_ij = W_ij² / U_jj²       (general.py, lines 237-288)

- Refined gradient on the domain set, the gradient of the regularized loss
  (lomo.py lines 136-166, λ = 0.1 hard-coded, η the learning rate)::

      g̃ = g + λ·2·η²·G ⊙ g² / 1000

- Dual importance, accumulated over domain batches (lomo.py lines 168-210)::

      S += | g̃ ⊙ θ + (g̃ ⊙ θ)² / 2000 + θ³ |
"""

from __future__ import annotations

import torch


def hessian_update(H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ x xᵀ of the rows of ``x`` [m, k] added to ``H`` [k, k] (the 2/n factor is applied later)."""
    x = x.reshape(-1, x.shape[-1]).to(H.dtype)
    return H + x.T @ x


def general_importance(
    weight: torch.Tensor, xxt: torch.Tensor, n: int | float, percdamp: float = 0.01
) -> torch.Tensor:
    """G = W² / diag(chol(H⁻¹)ᵀ)² with H = (2/n)·Σ x xᵀ damped by ``percdamp``·mean(diag H).

    Inputs never active (H_jj = 0) get H_jj = 1, as SparseGPT does.
    """
    H = (2.0 / max(float(n), 1.0)) * xxt.to(torch.float64)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H = H + percdamp * torch.mean(torch.diag(H)) * torch.eye(
        H.shape[0], dtype=H.dtype, device=H.device
    )
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    return weight.to(torch.float64) ** 2 / torch.diag(U).unsqueeze(0) ** 2


def refined_gradient(
    g: torch.Tensor, G: torch.Tensor, lam: float = 0.1, lr: float = 0.03
) -> torch.Tensor:
    """g̃ = g + λ·2·η²·G ⊙ g² / 1000 (the gradient of the regularized domain loss)."""
    return g + lam * 2.0 * lr**2 * G * g**2 / 1000.0


def dual_importance_increment(g_tilde: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """|g̃ ⊙ θ + (g̃ ⊙ θ)²/2000 + θ³|: one domain batch's contribution to S."""
    gt = g_tilde * theta
    return (gt + gt**2 / 2000.0 + theta**3).abs()


__all__ = ["dual_importance_increment", "general_importance", "hessian_update", "refined_gradient"]
