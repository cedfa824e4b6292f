"""MORE in pure torch: the ranking loss per task, the EMA, the min-norm weights, the rescaling.

Zeng et al., "On Diversified Preferences of Large Language Model Alignment" (arXiv
2312.07401), Multi-Objective Reward learning (MORE), as the official code implements it
(dunzeng/MORE ``trainer.py``: ``ranking_loss``, ``compute_lambda(_noresampling)``,
``more_ranking_loss``; ``utils.py``: ``gradient_normalizer``, ``calibration_error``). For T
preference datasets (tasks) t with N_t ranked pairs in the batch, N = Σ_t N_t::

    L_t   = −(1/N_t) Σ_{(i≻j) ∈ t} log σ(r_i − r_j)              ranking loss of task t
    m_t  ← (1 − α) m_t + α ∇_w L_t                               EMA of the reward head's gradient
    ĝ_t   = m_t / ‖m_t‖₂                                          normalize = "l2"
    λ     = argmin_{λ ∈ Δ_T'} ‖Σ_t λ_t ĝ_t‖²                       Frank–Wolfe min-norm point
    loss  = T' · Σ_t λ_t Σ_{(i≻j) ∈ t} −log σ(r_i − r_j) / N  =  Σ_t c_t L_t,
    c_t   = λ_t · T' · N_t / N

w is the reward head (the last linear layer), T' the number of tasks with pairs in the batch
(T under the official ``--resampling``, which gives every task the same N_t, so c = λ).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from paperhooks.gradients import min_norm_weights

PLUGIN = "more"

#: Frank–Wolfe budget and stopping rule of the official solver (``MinNormSolver.MAX_ITER``,
#: ``MinNormSolver.STOP_CRIT`` in ``min_norm_solvers.py``)
MAX_ITER = 1000
STOP_CRIT = 1e-5

Normalize = Literal["l2", "none"]


# -- the ranking loss ---------------------------------------------------------------------------
def scores_from_target(target: torch.Tensor, responses: int) -> torch.Tensor:
    """``[B, M]`` scores: 1 for the preferred response ``target``, 0 for the others."""
    return F.one_hot(target.long(), responses).to(torch.float32)


def pair_mask(scores: torch.Tensor) -> torch.Tensor:
    """``[B, M, M]``: entry (i, j) is a ranked pair, response i scored above response j.

    Scores below 0 mark padding (as in the official data), so they form no pair. Each
    unordered pair is counted once (the official mask counts it twice, in the sum and in the
    count alike, which leaves every mean unchanged).
    """
    valid = scores >= 0
    return (scores.unsqueeze(2) > scores.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)


def pair_losses(rewards: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of ``−log σ(r_i − r_j)`` over its ranked pairs, and their count.

    :param rewards: ``[B, M]`` rewards of the M responses to each prompt.
    :param scores: ``[B, M]`` their scores (higher is preferred, < 0 is padding).
    :return: ``(S [B], n [B])``; for M = 2, one pair per row: S = −log σ(r_chosen − r_rejected).
    """
    if rewards.dim() != 2 or rewards.shape != scores.shape or rewards.shape[1] < 2:
        raise ValueError(
            f"{PLUGIN}: rewards and scores must both have shape [B, M] with M >= 2 responses, "
            f"got {tuple(rewards.shape)} and {tuple(scores.shape)}"
        )
    mask = pair_mask(scores)
    margin = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # [B, M, M]: r_i − r_j
    losses = torch.where(mask, -F.logsigmoid(margin), torch.zeros_like(margin))
    return losses.sum(dim=(1, 2)), mask.sum(dim=(1, 2))


def ranking_loss(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean of ``−log σ(r_i − r_j)`` over all ranked pairs of the batch (official ``ranking_loss``)."""
    s, n = pair_losses(rewards, scores)
    total = n.sum()
    return s.sum() / total if total > 0 else s.sum()


def pair_probabilities(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[P]``: σ(r_i − r_j) for every ranked pair i ≻ j: the RM's probability that i wins."""
    mask = pair_mask(scores)
    margin = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    return torch.sigmoid(margin[mask])


def task_pair_counts(counts: torch.Tensor, task: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``[T]``: the number of ranked pairs of each task among these rows (float64)."""
    out = torch.zeros(num_tasks, dtype=torch.float64, device=counts.device)
    return out.index_add_(0, task.long(), counts.to(torch.float64))


# -- the weights --------------------------------------------------------------------------------
def ema(average: torch.Tensor, gradient: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − α)·m + α·g`` (official ``grad_m``; α = 0.99 keeps mostly the newest gradient)."""
    return (1 - alpha) * average + alpha * gradient


def normalized_gram(gram: torch.Tensor, normalize: Normalize = "l2") -> torch.Tensor:
    """Gram matrix of ĝ_t = m_t/‖m_t‖ from that of the m_t (``gradient_normalizer``).

    ``"l2"`` divides by the norm, a zero norm counting as 1 (as the official code does);
    ``"none"`` leaves the vectors alone.
    """
    if normalize == "none":
        return gram
    if normalize != "l2":
        raise ValueError(f"{PLUGIN}: normalize must be 'l2' or 'none', got {normalize!r}")
    norms = gram.diagonal().clamp_min(0).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return gram / (norms.unsqueeze(0) * norms.unsqueeze(1))


def min_norm_lambda(gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """λ over the tasks ``present`` in the batch (0 for the others), from ``[T, T]`` ⟨ĝ_s, ĝ_t⟩.

    Sener & Koltun's Frank–Wolfe min-norm solver (:func:`paperhooks.gradients.min_norm_weights`,
    the algorithm of the official ``MinNormSolver.find_min_norm_element_FW``) with the
    official iteration budget and stopping rule. One task present gets λ = 1, as in
    ``compute_lambda_noresampling``.
    """
    lam = torch.zeros(gram.shape[0], dtype=torch.float64)
    idx = present.nonzero().flatten().cpu()
    if idx.numel() == 1:
        lam[idx] = 1.0
    elif idx.numel() > 1:
        sub = gram.detach().to(torch.float64).cpu()[idx][:, idx]
        lam[idx] = min_norm_weights(sub, max_iter=MAX_ITER, tol=STOP_CRIT)
    return lam


def uniform_lambda(present: torch.Tensor) -> torch.Tensor:
    """λ_t = 1/T' over the present tasks: the official ``--reweight False`` (the plain mean)."""
    lam = present.to(torch.float64).cpu()
    return lam / lam.sum().clamp_min(1.0)


def loss_coefficients(lam: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """c_t = λ_t · T' · N_t / N: the coefficient of the per-task mean loss L_t.

    ``more_ranking_loss`` weighs each task's *summed* pair losses by λ_t, multiplies by the
    number of tasks T' and divides by the number of pairs N of the whole batch; written over
    the per-task means L_t that is Σ_t c_t L_t. With equal N_t (official resampling), c = λ.
    """
    counts = counts.detach().to(torch.float64).cpu()
    total = counts.sum()
    if total <= 0:
        return torch.zeros_like(counts)
    present = float((counts > 0).sum())
    return lam.to(torch.float64) * present * counts / total


def batch_rewards_and_scores(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards [B, M], scores [B, M])`` of a batch.

    The rewards are ``outputs["logits"]`` (the M responses' rewards). The scores are
    ``batch["score"]`` when the data ranks the responses (the official format, < 0 for
    padding), else 1 for the preferred response ``batch["target"]`` and 0 for the others.
    """
    rewards = outputs.get("logits")
    if rewards is None or rewards.dim() != 2 or rewards.shape[1] < 2:
        shape = None if rewards is None else tuple(rewards.shape)
        raise ValueError(
            f"{PLUGIN}: needs outputs['logits'] of shape [B, M >= 2], the rewards of M responses "
            f"per prompt (e.g. model: reward-mlp), got {shape}"
        )
    if "score" in batch:
        scores = batch["score"].to(rewards.device, torch.float32)
    elif "target" in batch:
        scores = scores_from_target(batch["target"].to(rewards.device), rewards.shape[1])
    else:
        raise ValueError(
            f"{PLUGIN}: the batch has neither 'score' nor 'target' (which response is preferred)"
        )
    return rewards, scores


__all__ = [
    "MAX_ITER",
    "PLUGIN",
    "STOP_CRIT",
    "batch_rewards_and_scores",
    "ema",
    "loss_coefficients",
    "min_norm_lambda",
    "normalized_gram",
    "pair_losses",
    "pair_mask",
    "pair_probabilities",
    "ranking_loss",
    "scores_from_target",
    "task_pair_counts",
    "uniform_lambda",
]
