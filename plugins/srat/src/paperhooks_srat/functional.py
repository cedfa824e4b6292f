"""Separable Reweighted Adversarial Training (SRAT) as pure torch functions — a RECONSTRUCTION.

Wang, Xu, Liu, Li, Thuraisingham, Tang, "Imbalanced Adversarial Training with Reweighting"
(arXiv 2107.13639). Only the paper's abstract could be read: it names reweighting of the
under-represented classes inside adversarial training and a term that makes the features of
different classes more separable. The equations below are a reconstruction in the shape the
abstract describes, not the paper's own (see the method card)::

    L = Σ_i w_{y_i} CE(f(x'_i), y_i) / Σ_i w_{y_i}  +  λ · (1/N) Σ_i ℓ_i

    w_c  ∝ 1/n_c  (or the effective-number weight (1 − β)/(1 − β^{n_c})),  Σ_c w_c = C
    ℓ_i  = [m + d(z_i, z_p(i)) − d(z_i, z_n(i))]_+            batch-hard triplet loss
    d(a, b) = ‖â − b̂‖²,  â = a/√(‖a‖² + ε)                        (FaceNet's distance)
    p(i) = argmax_{j ≠ i, y_j = y_i} d(z_i, z_j),  n(i) = argmin_{y_j ≠ y_i} d(z_i, z_j)

x'_i is the adversarial example of x_i (from an input-perturbation plugin, or x_i itself in
clean training), z_i the penultimate features of x'_i, n_c the number of training samples of
class c, C the number of classes and N the global batch size. The class weights switch on
after a deferred start (as in DRW, Cao et al. 2019); the separability term is on throughout.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PLUGIN = "srat"

Scheme = Literal["inverse", "effective"]
SCHEMES = ("inverse", "effective")


def class_weights(
    counts: torch.Tensor, scheme: Scheme = "inverse", beta: float = 0.9999
) -> torch.Tensor:
    """w_c, the class weights, normalized so that Σ_c w_c = C (the LDAM-DRW convention).

    :param counts: n_c, shape ``[C]``: training samples of each class (global, all ranks).
        A count below 1 (a class not counted yet) is taken as 1, the rarest a seen class can be.
    :param scheme: ``inverse`` (w_c ∝ 1/n_c) or ``effective`` (w_c ∝ (1 − β)/(1 − β^{n_c}),
        the inverse effective number of Cui et al. 2019).
    :param beta: β of the effective number, in [0, 1).
    :return: w, shape ``[C]``, float64, positive.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"{PLUGIN}: scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    n = counts.to(torch.float64).clamp_min(1.0)  # [C]
    if scheme == "inverse":
        w = 1.0 / n
    else:
        # (1 − β)/(1 − β^n) = 1/E_n; 1 − β^n = −expm1(n log β) keeps digits for β close to 1,
        # and β = 0 gives log β = −inf, 1 − β^n = 1: uniform weights
        log_beta = torch.log(torch.tensor(beta, dtype=torch.float64))
        w = (1.0 - beta) / -torch.expm1(n * log_beta)
    return w / w.sum() * w.numel()


NORM_EPS = 1e-6
"""ε of ẑ = z/√(‖z‖² + ε): ReLU features can be (nearly) zero, where z/‖z‖ has no gradient bound."""


def pairwise_distances(z: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """d(z_i, z_j) = ‖ẑ_i − ẑ_j‖², shape ``[N, N]``, with ẑ = z/√(‖z‖² + ε) when ``normalize``."""
    if normalize:
        # z/‖z‖ for any feature norm above ~1e-3; a zero feature maps to 0 with a bounded gradient
        z = z * torch.rsqrt((z * z).sum(dim=1, keepdim=True) + NORM_EPS)
    sq = (z * z).sum(dim=1)  # [N]
    # ‖a‖² + ‖b‖² − 2⟨a, b⟩ needs O(N²) memory, not the O(N²D) of differencing every pair
    return (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)


def batch_hard_triplet(
    z: torch.Tensor, y: torch.Tensor, margin: float = 0.2, normalize: bool = True
) -> torch.Tensor:
    """ℓ_i, the batch-hard triplet loss of every anchor (Hermans et al. 2017), shape ``[N]``.

    :param z: features, shape ``[N, D]`` (the whole global batch).
    :param y: labels, shape ``[N]``.
    :param margin: m.
    :param normalize: compare L2-normalized features (d ∈ [0, 4]).
    :return: ℓ, shape ``[N]``; 0 for an anchor whose class has no other sample in the batch or
        when the batch holds one class only (no triplet exists).
    """
    d = pairwise_distances(z, normalize)  # [N, N]
    same = y[:, None] == y[None, :]  # [N, N]
    positive = same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    negative = ~same
    valid = positive.any(dim=1) & negative.any(dim=1)  # [N]
    d_p = d.masked_fill(~positive, float("-inf")).amax(dim=1)  # hardest positive, [N]
    d_n = d.masked_fill(~negative, float("inf")).amin(dim=1)  # hardest negative, [N]
    zero = torch.zeros_like(d_p)
    # where() before the hinge keeps ±inf of anchors without a triplet out of the arithmetic
    gap = torch.where(valid, d_p, zero) - torch.where(valid, d_n, zero)
    return torch.where(valid, F.relu(margin + gap), zero)


def triplet_value_and_grad(
    Z: torch.Tensor, y: torch.Tensor, margin: float = 0.2, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ and G = ∂(Σ_i ℓ_i)/∂Z on a detached copy of the global features.

    Every rank computes the same ℓ and G from the same gathered ``Z``; :func:`linearize` then
    hands each rank the gradient of its own rows.

    :return: ℓ ``[N]`` and G ``[N, D]``, both without graph, in float32 or wider.
    """
    work = Z.detach().to(torch.promote_types(Z.dtype, torch.float32)).requires_grad_(True)
    with torch.enable_grad():
        loss = batch_hard_triplet(work, y, margin, normalize)  # [N]
        (grad,) = torch.autograd.grad(loss.sum(), work)
    return loss.detach(), grad


def linearize(values: torch.Tensor, grads: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample terms whose values are ``values`` and whose gradient w.r.t. ``z`` is ``grads``.

    t_i = v_i + ⟨G_i, z_i⟩ − ⟨G_i, z_i⟩ (the last one detached): the value is v_i exactly and
    ∂(Σ_i t_i)/∂z = G. This turns a loss over the whole global batch into per-sample terms,
    so that the core's mean over samples (and DDP's mean over ranks) gives its gradient.

    :param values: v, shape ``[B]``.
    :param grads: G, shape ``[B, D]`` (no graph).
    :param z: the features with their graph, shape ``[B, D]``.
    """
    inner = (grads.to(z.dtype) * z).sum(dim=1)  # [B]
    return values.to(z.dtype) + inner - inner.detach()


__all__ = [
    "SCHEMES",
    "batch_hard_triplet",
    "class_weights",
    "linearize",
    "pairwise_distances",
    "triplet_value_and_grad",
]
