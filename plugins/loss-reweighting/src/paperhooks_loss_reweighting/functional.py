"""Loss-based sample weights of Sow et al., ICLR 2025, as pure torch functions.

"Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining"
(arXiv 2502.06733), Algorithm 1. Formulas and defaults checked against the official code,
``src/trainer.py`` of sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025 (``h_func``,
``f_func_*``, ``g_func`` and ``DoGETrainer.training_step``).

Notation, for the B per-sample losses ℓ of one *global* batch (all ranks together)::

    h_i = δ (2 ℓ_i − l_max − l_min) / (l_max − l_min)        ∈ [−δ, δ]     (normalize)
    f_i = f(h_i)                                             (a strategy)
    w_i = exp((f_i − max_j f_j) / r) / Σ_k exp((f_k − max_j f_j) / r)      (sample_weights)

``r`` is the official ``kl_reg``: the weights solve max_w Σ w_i f_i − r·KL(w ‖ uniform) over
the simplex, so r → ∞ gives uniform weights and r → 0 puts all weight on arg max f.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PLUGIN = "loss-reweighting"
DEFAULT_EPS = 1e-6  # the official h_func floors l_max − l_min at 1e-6


def check_finite(losses: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the plugin when ``losses`` hold NaN or inf."""
    if not bool(torch.isfinite(losses).all()):
        bad = int((~torch.isfinite(losses)).sum())
        raise ValueError(
            f"{PLUGIN}: {bad} of {losses.numel()} per-sample losses are NaN or inf; "
            "loss-based weights are undefined for them"
        )


def normalize(losses: torch.Tensor, delta: float = 1.0, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """h_i: the losses mapped affinely onto [−δ, δ], l_min ↦ −δ and l_max ↦ δ.

    :param losses: ℓ, shape ``[B]``, the whole global batch.
    :param delta: δ, half-width of the range (the paper and code use 1).
    :param eps: floor of l_max − l_min, as in the official code; with all losses equal the
        numerator is exactly 0, so h = 0 for every sample and the weights come out uniform.
    :return: h, shape ``[B]``.
    """
    l_min, l_max = losses.min(), losses.max()  # [] each
    span = (l_max - l_min).clamp_min(eps)  # []
    # δ(2ℓ − l_max − l_min)/span equals the code's 2δℓ/span − δ(l_max + l_min)/span, written
    # so that equal losses give exactly 0 instead of a difference of two numbers of size ℓ/eps.
    return delta * (2.0 * losses - l_max - l_min) / span


def linupper(h: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """LinUpper, the paper's best: f = min(h + δ, δ). Low losses down-weighted, the upper half flat."""
    return torch.clamp(h + delta, max=delta)


def quadratic(h: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Quadratic (official name ``mid``): f = 1 − h²/δ². Favours medium losses."""
    return 1.0 - h**2 / delta**2


def extremes(h: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Extremes: f = |h|. Favours the lowest and the highest losses."""
    return h.abs()


def upper(h: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Upper: f = (h + δ)/2. Weight grows with the loss over the whole range."""
    return 0.5 * h + 0.5 * delta


STRATEGIES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "linupper": linupper,
    "quadratic": quadratic,
    "extremes": extremes,
    "upper": upper,
}
"""Strategy name -> f(h, δ). The official code calls ``quadratic`` ``mid``."""


def sample_weights(
    losses: torch.Tensor,
    strategy: str = "linupper",
    r: float = 1.0,
    delta: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """w: the paper's weights of the samples of one global batch; they sum to 1.

    :param losses: ℓ, shape ``[B]``, detached, from *all* ranks (the min, max and the softmax
        are over the global batch).
    :param strategy: a key of :data:`STRATEGIES`.
    :param r: the KL regularization (official ``kl_reg``), > 0; the temperature of the softmax.
    :param delta: δ of :func:`normalize` and of the strategy.
    :return: w, shape ``[B]``, non-negative, Σ w = 1, in the dtype of ``losses``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"{PLUGIN}: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}"
        )
    if not r > 0:
        raise ValueError(f"{PLUGIN}: r (kl_reg) must be > 0, got {r!r}")
    losses = losses.detach()
    check_finite(losses)
    work = losses.to(torch.promote_types(losses.dtype, torch.float32))  # no softmax in bf16
    h = normalize(work, delta, eps)  # [B]
    f = STRATEGIES[strategy](h, delta)  # [B]
    # Subtracting max f (as the official g_func call does) leaves the softmax unchanged and
    # keeps exp() ≤ 1, so a small r cannot overflow.
    w = torch.softmax((f - f.max()) / r, dim=0)  # [B]
    return w.to(losses.dtype)


def weight_entropy(w: torch.Tensor) -> torch.Tensor:
    """−Σ w log w, in nats (log B for uniform weights over B samples); 0·log 0 counts 0."""
    return -torch.special.xlogy(w, w).sum()


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """ESS = (Σ w)² / Σ w², which is 1/Σ w² for weights summing to 1 (B when uniform)."""
    return w.sum() ** 2 / (w**2).sum()


__all__ = [
    "STRATEGIES",
    "check_finite",
    "effective_sample_size",
    "extremes",
    "linupper",
    "normalize",
    "quadratic",
    "sample_weights",
    "upper",
    "weight_entropy",
]
