"""Ranking accuracy and idealized ranking accuracy as pure torch functions.

Chen, Malladi, Zhang, Chen, Zhang, Ranganath and Cho, "Preference Learning Algorithms Do Not
Learn Preference Rankings" (NeurIPS 2024, arXiv 2405.19534). Notation of the paper: a pair
``(x, y_w, y_l)``, a policy ``π_θ``, a reference ``π_Ref``, the DPO/RLHF strength ``β`` and
``α = P(y_w ≻ y_l)``, the proportion of raters who prefer ``y_w``.

- **Ranking accuracy** (Def. 2.3)::

      R(x, y_w, y_l; π_θ) = 1[ π_θ(y_w|x) ≥ π_θ(y_l|x) ]          (note ≥)

  ``R̃`` is the same on length-normalized likelihoods ``π̃(y|x) = π(y|x)^{1/|y|}``.

- **Idealized ranking accuracy** (Theorem 3.1, Corollary 3.3): the optimum of the DPO or
  RLHF objective under Bradley–Terry has ``π*(y_w|x)/π*(y_l|x) = π_Ref(y_w|x)/π_Ref(y_l|x) ·
  (α/(1−α))^{1/β}``, so the best a perfectly optimised model can reach is::

      R*(D; π_Ref) = E 1[ π_Ref(y_w|x)/π_Ref(y_l|x) · (α/(1−α))^{1/β} > 1 ]   (strict >)

  computed here in log space: ``log π_Ref(y_w) − log π_Ref(y_l) + (1/β)·log(α/(1−α)) > 0``.
  For a unanimous vote (``α = 1``; the optimum is at infinity) the official code
  (``rlhf_minimizer_client.py``, ``_compute_likelihood_ratios_helper``, with ``eps = 1e-3`` from
  ``calculate_upper_bound_rlhf.py``) divides by ``ε`` instead of ``1 − α``: odds ``α/ε``.

- **Difficulty** (Theorem 4.1): with ``c = log π_Ref(y_l|x)/π_Ref(y_w|x)`` (the reference's
  mis-ranking), ``R = 1`` iff ``L_DPO(x, y_w, y_l) ≤ −log σ(β c)``.

Shapes: every argument is ``[B]`` (one value per pair) unless said otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def length_normalize(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log π̃(y|x) = log π(y|x) / |y|``: the sum of response log-probs over the number of
    response tokens (``mask`` ``[B, T]``: 1 on the response; padding and prompt never count)."""
    return logps / mask.sum(1).clamp_min(1)


def ranking_correct(logp_w: torch.Tensor, logp_l: torch.Tensor) -> torch.Tensor:
    """``R`` per pair (Def. 2.3): ``log π_θ(y_w|x) ≥ log π_θ(y_l|x)`` (bool ``[B]``)."""
    return logp_w >= logp_l


def log_odds(alpha: torch.Tensor | float, eps: float = 1e-3) -> torch.Tensor:
    """``log(α/(1−α))``, with ``1−α`` replaced by ``ε`` where it is 0 (the official code's rule)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    loser = torch.where(alpha < 1, 1 - alpha, torch.full_like(alpha, eps))
    return alpha.log() - loser.log()


def idealized_correct(
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    alpha: torch.Tensor | float,
    beta: float,
    eps: float = 1e-3,
) -> torch.Tensor:
    """``R*`` per pair (Cor. 3.3): ``log π_Ref(y_w) − log π_Ref(y_l) + (1/β)·log(α/(1−α)) > 0``.

    Whether the exact DPO/RLHF optimum with reference ``π_Ref`` ranks the pair correctly
    (Theorem 3.1). Computed in float64 (``(α/(1−α))^{1/β}`` overflows float32 for small β).
    """
    margin = (ref_logp_w - ref_logp_l).to(torch.float64) + log_odds(alpha, eps).to(
        ref_logp_w.device
    ) / beta
    return margin > 0


def difficulty_threshold(c: torch.Tensor | float, beta: float) -> torch.Tensor:
    """``−log σ(β c)`` (Theorem 4.1): the DPO loss a pair with reference mis-ranking ``c =
    log π_Ref(y_l)/π_Ref(y_w)`` must get below to be ranked correctly."""
    return -F.logsigmoid(beta * torch.as_tensor(c, dtype=torch.float64))


def reference_misranking(ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor) -> torch.Tensor:
    """``c = log π_Ref(y_l|x) − log π_Ref(y_w|x)`` (Theorem 4.1); > 0: the reference mis-ranks."""
    return ref_logp_l - ref_logp_w


__all__ = [
    "difficulty_threshold",
    "idealized_correct",
    "length_normalize",
    "log_odds",
    "ranking_correct",
    "reference_misranking",
]
