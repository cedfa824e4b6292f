"""Aranyani's fairness gradient as pure torch functions, in the paper's notation.

Chowdhury et al., "Enhancing Group Fairness in Online Settings Using Oblique Decision
Forests" (ICLR 2024). An oblique tree routes x through internal nodes whose decisions are
n_i(x) = σ(w_iᵀx + b_i). Demographic parity is enforced *per node*: with

    F_i = E_{x|a=1}[n_i(x)] − E_{x|a=0}[n_i(x)]                      (one F per tree and node)

the fairness term is λ·H(F_i) with H the Huber loss, whose gradient with respect to node i's
own parameters θ_i = (w_i, b_i) is

    ∂/∂θ_i λ·H(F_i) = λ · H'(F_i) · (E_1[∂n_i/∂θ_i] − E_0[∂n_i/∂θ_i])

(n_i depends on θ_i only: "parameter isolation"). Both expectations come from running
aggregates over the stream, so no past sample is stored or re-run. Leaf parameters get no
fairness gradient. The formulas and constants were checked against ``src/aranyani.py`` of
brcsomnath/Aranyani at commit af2cf3f (``train_online``): δ = 0.01 (``huber_loss_delta``),
γ = 0.9 (``base_gamma``), the three averaging rules of ``gradient_type``.
"""

from __future__ import annotations

from typing import Literal

import torch

PLUGIN = "aranyani"

GradientType = Literal["vanilla", "momentum", "ema"]


def huber_derivative(F: torch.Tensor, delta: float) -> torch.Tensor:
    """H'(F): ``F`` where ``|F| < δ``, else ``sign(F − δ/2)`` (the official expression).

    For ``|F| ≥ δ`` the sign of ``F − δ/2`` is the sign of ``F``, so this is the derivative of
    the Huber loss ½F² (quadratic zone) / |F| (linear zone) up to the scale of its linear part.
    """
    return torch.where(F.abs() < delta, F, torch.sign(F - delta / 2))


def fairness_gradient(
    F: torch.Tensor, grad_1: torch.Tensor, grad_0: torch.Tensor, lam: float, delta: float
) -> torch.Tensor:
    """λ · H'(F) · (E_1[∂n/∂θ] − E_0[∂n/∂θ]) for one parameter of the internal nodes.

    :param F: ``[T, N]``: F per tree and internal node.
    :param grad_1: E_1[∂n/∂θ], ``[T, *, N]`` with the node axis last (``[T, D, N]`` for W,
        ``[T, N]`` for B): the entry of node i is ∂n_i/∂θ_i averaged over group 1.
    :param grad_0: E_0[∂n/∂θ], same shape.
    :return: the fairness gradient, same shape as ``grad_1``.
    """
    if grad_1.shape != grad_0.shape:
        raise ValueError(
            f"{PLUGIN}: E_1 and E_0 gradients differ in shape: {tuple(grad_1.shape)} vs {tuple(grad_0.shape)}"
        )
    t, n = F.shape
    if grad_1.shape[0] != t or grad_1.shape[-1] != n:
        raise ValueError(
            f"{PLUGIN}: F is [{t}, {n}] but the gradients are {tuple(grad_1.shape)} (need [T, ..., N])"
        )
    h = huber_derivative(F, delta).reshape(t, *([1] * (grad_1.dim() - 2)), n)
    return lam * h * (grad_1 - grad_0)


def group_gap(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """F = S_1/N_1 − S_0/N_0 from the running sums ``S_a`` (``[2, ...]``) and counts ``N_a`` (``[2]``)."""
    shape = (2, *([1] * (sums.dim() - 1)))
    means = sums / counts.reshape(shape)
    return means[1] - means[0]


# -- running averages of E_a[∂n/∂θ] ------------------------------------------------------------------
def accumulate(
    avg: torch.Tensor,
    count: float,
    batch_mean: torch.Tensor,
    n: float,
    kind: GradientType,
    gamma: float,
) -> torch.Tensor:
    """Fold ``n`` new samples of one group, with mean gradient ``batch_mean``, into ``avg``.

    ``count`` is the number of samples of the group seen *before* this batch.

    - ``vanilla`` (official default): the running mean, ``g_t = g_{t−1}(1 − 1/t) + ∂n/∂θ · 1/t``
      per sample. Folding a batch of n samples at once gives the same mean exactly.
    - ``momentum`` and ``ema``: the accumulator ``m_t = γ m_{t−1} + ∂n/∂θ`` per sample. For a
      batch of n samples this uses ``m ← γⁿ m + (1 − γⁿ)/(1 − γ) · mean``: every sample of the
      batch gets the batch's average decay. Exact for n = 1, an approximation (order within the
      batch ignored) for n > 1.
    """
    if n <= 0:
        return avg
    if kind == "vanilla":
        return avg + (batch_mean - avg) * (n / (count + n))
    decay = gamma**n
    return decay * avg + (1 - decay) / (1 - gamma) * batch_mean


def correction(count: float, kind: GradientType, gamma: float) -> float:
    """The factor the accumulator is multiplied by to give E_a[∂n/∂θ].

    ``ema``: the bias correction ``(1 − γ)/(1 − γ^t)`` (t = samples of the group so far), which
    makes the weights of the accumulator sum to 1. ``vanilla`` (already a mean) and the
    official ``momentum`` (uncorrected accumulator): 1.
    """
    if kind == "ema":
        return (1 - gamma) / (1 - gamma**count)
    return 1.0


# -- the metric ----------------------------------------------------------------------------------------
def demographic_parity(pred: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """|P(ŷ = 1 | a = 1) − P(ŷ = 1 | a = 0)| of binary predictions (``utils.get_demographic_parity``)."""
    pred, group = pred.double(), group.long()
    return (pred[group == 1].mean() - pred[group == 0].mean()).abs()


__all__ = [
    "GradientType",
    "accumulate",
    "correction",
    "demographic_parity",
    "fairness_gradient",
    "group_gap",
    "huber_derivative",
]
