"""KL-DRO instance weights of DONE (Sow et al., ICLR 2024) as pure torch functions.

"Doubly Robust Instance-Reweighted Adversarial Training" (arXiv 2308.00311). The outer
problem weights the adversarial losses ℓ_i = ℓ(θ; x_i + δ_i) of the n training samples by
the worst case over the simplex, regularized by the KL divergence to uniform (Eq. 5)::

    min_θ  max_{w ∈ Δ_n}  Σ_i w_i ℓ_i − r · KL(w ‖ 1/n)

The inner maximum has the closed form w_i* = exp(ℓ_i / r) / Σ_j exp(ℓ_j / r); substituted
back, the objective is the compositional r · log((1/n) Σ_i exp(ℓ_i / r)) (Eq. 6), whose
gradient is Σ_i w_i* ∇ℓ_i. Its inner function g = (1/n) Σ_i exp(ℓ_i / r) is a mean over all
the data, which one mini-batch estimates only with a biased log; the stochastic
compositional scheme (SCGD, which the paper's CID modifies) tracks it with a running estimate

    u_t = (1 − β) u_{t−1} + β · (1/|B|) Σ_{i∈B} exp(ℓ_i / r)          (u_0: the first batch)

and steps along (1/|B|) Σ_{i∈B} exp(ℓ_i / r) ∇ℓ_i / u_t. That is the batch softmax weights
times the scalar c_t = ((1/|B|) Σ_{i∈B} exp(ℓ_i / r)) / u_t, which is how the plugin applies
it (:func:`coefficient`). β = 1 gives c_t = 1: plain within-batch softmax weights.

Everything is kept in log space (log u, log-mean-exp) so that a small r cannot overflow.
The paper's method section could not be read (stored copies of the full text returned only
their opening to searches): the closed form is fixed by the KL-regularized problem the
abstract and reviews describe; the running estimate u_t and its rate β are a reconstruction
(see the method card).
"""

from __future__ import annotations

import math

import torch

PLUGIN = "done"


def check_finite(losses: torch.Tensor, bad: int | None = None) -> None:
    """Raise ``ValueError`` naming the plugin when ``losses`` (or ``bad`` > 0 of the global batch) are NaN/inf."""
    bad = int((~torch.isfinite(losses)).sum()) if bad is None else bad
    if bad:
        raise ValueError(
            f"{PLUGIN}: {bad} per-sample losses of the batch are NaN or inf; the KL-DRO weights "
            "exp(ℓ/r) are undefined for them"
        )


def closed_form_weights(losses: torch.Tensor, r: float) -> torch.Tensor:
    """w*: the maximizer of Σ_i w_i ℓ_i − r·KL(w ‖ 1/n) over the simplex, = softmax(ℓ / r).

    :param losses: ℓ, shape ``[n]``, detached, of the whole (global) batch.
    :param r: the KL regularization > 0. r → ∞ gives uniform weights, r → 0 all weight on
        the largest loss.
    :return: w*, shape ``[n]``, Σ w* = 1, in float32 or wider.
    """
    check_finite(losses)
    z = losses.detach().to(torch.promote_types(losses.dtype, torch.float32)) / r
    return torch.softmax(z, dim=0)


def log_mean_exp(z: torch.Tensor) -> torch.Tensor:
    """log((1/n) Σ_i exp(z_i)), without overflow, in float64."""
    z = z.detach().to(torch.float64)
    return torch.logsumexp(z, dim=0) - math.log(z.numel())


def update_log_u(log_u: torch.Tensor | None, log_g: torch.Tensor, beta: float) -> torch.Tensor:
    """log u_t from log u_{t−1} and log ĝ_t = log((1/|B|) Σ_B exp(ℓ/r)).

    u_t = (1 − β) u_{t−1} + β ĝ_t, written as a log-sum-exp; u_0 = ĝ_0 (no previous estimate).
    """
    if log_u is None:
        return log_g.clone()
    if beta >= 1.0:
        return log_g.clone()
    return torch.logaddexp(log_u + math.log1p(-beta), log_g + math.log(beta))


def coefficient(log_g: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """c_t = ĝ_t / u_t: the scale that turns batch-softmax weights into the tracked estimate."""
    return torch.exp(log_g - log_u)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(Σ w)² / Σ w², for weights of any scale (n when uniform, 1 when one-hot)."""
    w = w.to(torch.float64)
    return w.sum() ** 2 / (w**2).sum()


__all__ = [
    "check_finite",
    "closed_form_weights",
    "coefficient",
    "effective_sample_size",
    "log_mean_exp",
    "update_log_u",
]
