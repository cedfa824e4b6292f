"""INPO as pure torch functions: the per-iteration loss, on-policy pair weights, exploitability.

Zhang, Yu, Peng, Song, Tian, Huo, Jiang, Mi and Yu, "Iterative Nash Policy Optimization:
Aligning LLMs with General Preferences via No-Regret Learning" (ICLR 2025, arXiv 2407.00617).
Notation of the paper: η > 0 the online-mirror-descent (OMD) parameter (1/η is its learning
rate), τ the KL strength, π_ref the reference (π₁ = π_ref), π_t the policy of iteration t,
P(y ≻ y′) a general (possibly non-transitive) preference.

- OMD step (Eq. 4) with the game loss ℓ_t(π) = −E_{y∼π, y′∼π_t}[P(y ≻ y′)] + τ·KL(π‖π_ref)::

      π_{t+1} = argmin_π ⟨∇ℓ_t(π_t), π⟩ + η·KL(π‖π_t)

  in closed form (Eq. 5): ``π_{t+1}(y) ∝ exp(P(y ≻ π_t)/η) · π_ref(y)^{τ/η} · π_t(y)^{1−τ/η}``.

- The log-ratio function (§3.2)::

      h_t(π, y, y′) = log π(y)/π(y′) − (τ/η)·log π_ref(y)/π_ref(y′) − ((η−τ)/η)·log π_t(y)/π_t(y′)

- The per-iteration loss (Eq. 8, Algorithm 1 line 5), on pairs y, y′ ∼ π_t labelled by the
  preference oracle as (y_w, y_l)::

      L_t(π) = E[ ( h_t(π, y_w, y_l) − 1/(2η) )² ]

  Proposition 6: it equals E[(h_t − (P(y≻π_t) − P(y′≻π_t))/η)²] up to a constant, whose
  minimizer is the OMD step above.

- Exploitability (the duality gap of the symmetric constant-sum game, halved)::

      max_y P(y ≻ π) − P(π ≻ π) = max_y P(y ≻ π) − 1/2      (0 exactly at a Nash policy)

Defaults (§4.1, App. B): T = 3 iterations, η = 0.005, τ = η/3 (so τ/η = 1/3, 1/(2η) = 100).
No official code was found; everything is checked against the paper's text.
"""

from __future__ import annotations

import torch


def log_ratio_h(
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    snap_logp_w: torch.Tensor,
    snap_logp_l: torch.Tensor,
    eta: float,
    tau: float,
) -> torch.Tensor:
    """``h_t(π, y_w, y_l)`` per pair ``[B]``; ``logp`` of π, ``ref_logp`` of π_ref, ``snap_logp`` of π_t."""
    r = tau / eta
    return (logp_w - logp_l) - r * (ref_logp_w - ref_logp_l) - (1 - r) * (snap_logp_w - snap_logp_l)


def inpo_loss(h: torch.Tensor, eta: float) -> torch.Tensor:
    """``(h_t − 1/(2η))²`` per pair (Eq. 8)."""
    return (h - 1 / (2 * eta)) ** 2


def on_policy_weights(snap_logp_w: torch.Tensor, snap_logp_l: torch.Tensor) -> torch.Tensor:
    """Importance weights ``∝ π_t(y_w)·π_t(y_l)`` with mean 1 over the given pairs.

    Eq. 8 is an expectation over y, y′ ∼ π_t. For a fixed set of pairs covering every
    response pair once, weighting each by π_t(y_w)π_t(y_l) turns the set's mean into that
    expectation (an unordered pair {a, b} has probability 2π_t(a)π_t(b) under π_t ⊗ π_t).
    Pass the **global** batch so the weights do not depend on how it is split.
    """
    s = (snap_logp_w + snap_logp_l).detach()
    return torch.softmax(s.double(), 0).to(s.dtype) * s.numel()


def omd_step(
    log_pi_t: torch.Tensor, log_pi_ref: torch.Tensor, win_rate: torch.Tensor, eta: float, tau: float
) -> torch.Tensor:
    """Eq. 5: ``log π_{t+1}`` over the last dimension, from ``win_rate`` = P(y ≻ π_t) ``[..., M]``."""
    r = tau / eta
    return (win_rate / eta + r * log_pi_ref + (1 - r) * log_pi_t).log_softmax(-1)


def win_rates(pi: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """``P(y ≻ π) = Σ_y′ π(y′) P(y ≻ y′)`` for every y: ``pi`` ``[P, M]``, ``preference`` ``[P, M, M]``."""
    return torch.einsum("pij,pj->pi", preference.to(pi.dtype), pi)


def exploitability(pi: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """``max_y P(y ≻ π) − 1/2`` per prompt ``[P]`` (needs ``P(y ≻ y) = 1/2`` on the diagonal)."""
    return win_rates(pi, preference).max(-1).values - 0.5


__all__ = [
    "exploitability",
    "inpo_loss",
    "log_ratio_h",
    "omd_step",
    "on_policy_weights",
    "win_rates",
]
