"""``dsee`` as pure torch: low-rank + sparse adaptation of a frozen weight (DSEE, ACL 2023).

Chen, Chen, Chen, Awadallah, Wang, Cheng, *DSEE: Dually Sparsity-embedded Efficient Tuning of
Pre-trained Language Models* (arXiv 2111.00160); official code VITA-Group/DSEE @ 61844c3.

Step 1, the reparameterization (``modeling_bert.py`` forward, lines 350–357; init 839–848)::

    W' = W + (α/r)·B A + (α/r)·(S ⊙ Ω)        W [out, in] frozen; B [out, r] = 0; A [r, in] ~ N(0, 0.02)
                                              S [out, in] = 0 trainable on the support Ω only

The support Ω (N = ``num_sparse`` entries) is the top-N of |S̃| for the sparse part S̃ of a
GreBsmo-style low-rank + sparse decomposition W ≈ U V + S̃ (``run_glue.py`` lines 385–475):

    U ← randn(out, 1), V ← randn(1, in)
    repeat ``iters`` times:                       (official: 100; rank grows by ``rank_step`` = 5)
        S̃ ← 0
        repeat ``inner`` (2) times:
            U ← Q of QR((W − S̃) Vᵀ);  V ← Uᵀ (W − S̃);  S̃ ← W − U V;  S̃[|S̃| < τ] ← 0   (τ = 0.01)
        E ← W − U V − S̃;  V ← [V ; first ``rank_step`` rows of R of QR(E)]

Step 2 (``run_glue_prune_with_WAB.py`` lines 588–621): prune, then tune A, B, S again with W
frozen. Importance per ``--prune_mode``: ``ABS`` (the scripts) = |(α/r)(B A + S ⊙ Ω)|, the
learned update only; ``WABS`` (the code default) = |W + B A + (α/r) S ⊙ Ω| (B A unscaled there);
here ``wabs`` is |W'|, the merged weight (the core's magnitude criterion), scaled consistently.
"""

from __future__ import annotations

import torch
from torch import nn


def grebsmo_sparse(
    W: torch.Tensor,
    *,
    iters: int = 100,
    inner: int = 2,
    rank_step: int = 5,
    tau: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """S̃ of the GreBsmo-style loop above (float64 internally), ``[out, in]``."""
    W = W.detach().double().cpu()
    out_f, in_f = W.shape
    U = torch.randn(out_f, 1, dtype=torch.float64, generator=generator)
    V = torch.randn(1, in_f, dtype=torch.float64, generator=generator)
    S = torch.zeros_like(W)
    for _ in range(iters):
        S = torch.zeros_like(W)
        for _ in range(inner):
            U, _r = torch.linalg.qr((W - S) @ V.T)
            V = U.T @ (W - S)
            S = W - U @ V
            S = torch.where(S.abs() < tau, torch.zeros_like(S), S)
        E = W - U @ V - S
        _q, R = torch.linalg.qr(E)
        V = torch.cat([V, R[:rank_step]], dim=0)
    return S


def support(S: torch.Tensor, num_sparse: int) -> torch.Tensor:
    """Ω: boolean mask of the ``num_sparse`` largest |S| (stable: of equal values the earlier).

    The official code thresholds at the N-th largest value (``kthvalue``), which may keep more
    on ties; here exactly N are kept.
    """
    flat = S.abs().reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[order[: min(num_sparse, flat.numel())]] = True
    return out.view_as(S)


def dsee_delta(
    A: torch.Tensor, B: torch.Tensor, S: torch.Tensor, omega: torch.Tensor, scaling: float
) -> torch.Tensor:
    """ΔW = (α/r)·(B A + S ⊙ Ω), ``[out, in]``."""
    return scaling * (B @ A + S * omega)


class DseeDelta(nn.Module):
    """The parametrization ``W ↦ W + (α/r)(B A + S ⊙ Ω)`` with B = 0, S = 0 at the start."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        r: int,
        alpha: float,
        omega: torch.Tensor,
        init_std: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.r, self.scaling = r, alpha / r
        self.A = nn.Parameter(torch.randn(r, in_features, generator=generator) * init_std)
        self.B = nn.Parameter(torch.zeros(out_features, r))
        self.S = nn.Parameter(torch.zeros(out_features, in_features))
        self.register_buffer("omega", omega.clone().bool())

    def delta(self) -> torch.Tensor:
        return dsee_delta(self.A, self.B, self.S, self.omega, self.scaling)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, num_sparse={int(self.omega.sum())}"


__all__ = ["DseeDelta", "dsee_delta", "grebsmo_sparse", "support"]
