"""The three ParetoDA objectives and their pieces, pure torch, in the paper's notation.

Lv et al., "Pareto Domain Adaptation" (NeurIPS 2021), §3; formulas checked against the
official code ``BIT-DA/ParetoDA`` at commit ``6691766`` (``tools/TCM_loss.py``,
``dalib/modules/cls_domaindiscri.py``, ``dalib/modules/grl.py``, ``dalib/adaptation/dann.py``,
``examples/DANN+ParetoDA.py``).

Notation: ``y`` classifier logits ``[B, C]``; ``D_k(f) = P(d = target | f, y = k)`` the output
of the per-class domain discriminator k, ``[B, C]``; ``ρ`` refined target predictions
``[B, C]`` (rows on the simplex); ``p̄`` the mean of ``ρ`` over the *global* batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

PLUGIN = "pareto-da"

#: the constant inside log(p̄ + ε) of the official ``TCM`` (``tools/TCM_loss.py``)
TCM_EPS = 1e-6

Refine = Literal["logits", "bayes"]


def grl_coefficient(
    step: int, max_steps: int, hi: float = 1.0, lo: float = 0.0, alpha: float = 1.0
) -> float:
    """λ of the warm-start gradient reversal layer (dalib ``WarmStartGradientReverseLayer``).

    ``λ(i) = 2(hi − lo) / (1 + exp(−α i / N)) − (hi − lo) + lo``: 0 at step 0, rising to ``hi``.
    """
    return 2.0 * (hi - lo) / (1.0 + math.exp(-alpha * step / max_steps)) - (hi - lo) + lo


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``x`` in the forward pass, ``−λ ∂`` in the backward pass (DANN's gradient reversal).

    Written as ``x̂ + λ (x̂ − x)`` with ``x̂ = x.detach()``: the value is exactly ``x`` and the
    gradient ``−λ``; unlike a custom ``autograd.Function`` it is batched by ``vmap``, so the
    core's one batched backward pass over all objectives works through it.
    """
    fixed = x.detach()
    return fixed + lam * (fixed - x)


def refine(logits: torch.Tensor, d_target: torch.Tensor, mode: Refine = "logits") -> torch.Tensor:
    """ρ: target predictions refined by the per-class domain discriminators ``D`` ``[B, C]``.

    Bayes: ``p(y = k | x, d = t) ∝ p(y = k | x) · P(d = t | x, y = k)``.

    - ``"bayes"``: ``ρ_k = softmax(y)_k D_k / Σ_j softmax(y)_j D_j``, the rule as stated.
    - ``"logits"`` (default): ``ρ = softmax(y ⊙ D)``, what the official code computes
      (``rho_pred`` multiplies the *logits* by ``D``; ``TCM`` applies the softmax).
    """
    return log_refine(logits, d_target, mode).exp()


def log_refine(
    logits: torch.Tensor, d_target: torch.Tensor, mode: Refine = "logits"
) -> torch.Tensor:
    """``log ρ`` of :func:`refine`, computed in log space: finite where ρ underflows to 0."""
    if mode == "logits":
        return torch.log_softmax(logits * d_target, dim=1)
    if mode == "bayes":
        joint = torch.log_softmax(logits, dim=1) + torch.log(d_target.clamp_min(1e-30))
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)
    raise ValueError(f"{PLUGIN}: refine must be 'logits' or 'bayes', got {mode!r}")


def entropy(p: torch.Tensor, log_p: torch.Tensor | None = None) -> torch.Tensor:
    """``H(p) = −Σ_k p_k log p_k`` over the last dimension (0 log 0 = 0).

    Given ``log_p`` (e.g. a log-softmax), the gradient stays finite where ``p`` underflows to
    0; from ``p`` alone it is ``log p + 1 = −∞`` there.
    """
    if log_p is None:
        return -torch.special.xlogy(p, p).sum(dim=-1)
    return -(p * log_p).sum(dim=-1)


def tcm(rho: torch.Tensor) -> torch.Tensor:
    """Target-classification-mimicking score of a batch ``ρ`` ``[B, C]`` (a scalar).

    ``TCM = H_ε(p̄) − (1/B) Σ_i H(ρ_i)`` with ``p̄ = (1/B) Σ_i ρ_i`` and
    ``H_ε(p̄) = −Σ_k p̄_k log(p̄_k + ε)``, ε = 1e-6. Diverse (high ``H(p̄)``) and confident (low
    ``H(ρ_i)``) predictions score high; the loss is ``L_T = −TCM``. Uniform rows give 0;
    one-hot rows spread evenly over C classes give ``log C``.
    """
    p_bar = rho.mean(dim=0)
    return -(p_bar * torch.log(p_bar + TCM_EPS)).sum() - entropy(rho).mean()


def tcm_terms(
    rho: torch.Tensor, p_bar: torch.Tensor, log_rho: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample terms ``[B]`` whose mean over the global batch is :func:`tcm`, gradient included.

    ``H_ε(p̄)`` is not a mean over samples, so it is linearized at the global ``p̄`` (given,
    detached): ``t_i = H_ε(p̄) + ⟨∇H_ε(p̄), ρ_i − p̄⟩ − H(ρ_i)`` with
    ``∂H_ε/∂p̄_k = −log(p̄_k + ε) − p̄_k / (p̄_k + ε)``. The mean of ``t_i`` over the batch whose
    mean is ``p̄`` equals ``TCM`` and has the same gradient with respect to every ``ρ_i``;
    split over ranks, each rank's mean is an unbiased share of it, so N processes = 1.
    ``log_rho`` (optional) keeps the gradient of ``H(ρ_i)`` finite where ``ρ`` underflows.
    """
    p_bar = p_bar.detach()
    h_bar = -(p_bar * torch.log(p_bar + TCM_EPS)).sum()
    grad = -torch.log(p_bar + TCM_EPS) - p_bar / (p_bar + TCM_EPS)  # [C]
    return h_bar + (rho - p_bar) @ grad - entropy(rho, log_rho)


def domain_bce(d_source: torch.Tensor, d_target: torch.Tensor) -> torch.Tensor:
    """DANN's discriminator loss per row, from logits ``[B]`` (source labelled 1, target 0).

    ``½ [BCE(D(f_s), 1) + BCE(D(f_t), 0)]`` (dalib ``DomainAdversarialLoss``).
    """
    ones, zeros = torch.ones_like(d_source), torch.zeros_like(d_target)
    return 0.5 * (
        F.binary_cross_entropy_with_logits(d_source, ones, reduction="none")
        + F.binary_cross_entropy_with_logits(d_target, zeros, reduction="none")
    )


def class_domain_bce(
    s_source: torch.Tensor, s_target: torch.Tensor, labels: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Training loss of the per-class domain discriminators, per row ``[B]``.

    ``s`` are their logits of ``P(d = target | f, y = k)``, ``[B, C]``. Discriminator k learns
    source samples of class k (weight ``1[y_i = k]``) against target samples weighted by their
    refined probability of class k (``ρ_ik``, held fixed)::

        L_cd = ½ · (1/C) Σ_k [ mean_i 1[y_i = k] BCE(s_k(f_i^s), 0) + mean_j ρ_jk BCE(s_k(f_j^t), 1) ]

    Row i carries source sample i and target sample i, so the batch mean of the rows is L_cd.
    (The official ``binary_CE`` intends this; see the method card for how it differs.)
    """
    c = s_source.shape[1]
    own = s_source.gather(1, labels.view(-1, 1)).squeeze(1)  # s_{y_i}(f_i^s)
    src = F.binary_cross_entropy_with_logits(own, torch.zeros_like(own), reduction="none")
    tgt = F.binary_cross_entropy_with_logits(s_target, torch.ones_like(s_target), reduction="none")
    return 0.5 * (src + (rho.detach() * tgt).sum(dim=1)) / c


__all__ = [
    "PLUGIN",
    "TCM_EPS",
    "Refine",
    "class_domain_bce",
    "domain_bce",
    "entropy",
    "grl_coefficient",
    "log_refine",
    "refine",
    "reverse_gradient",
    "tcm",
    "tcm_terms",
]
