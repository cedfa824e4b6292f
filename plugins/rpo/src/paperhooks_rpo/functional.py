"""RPO as pure torch functions (Liu, Lu, Zhang et al., NeurIPS 2024, arXiv 2405.16436).

Regularized Preference Optimization (the paper's Algorithm 2, the implementation-friendly
form of its adversarial Algorithm 1): DPO's loss plus a supervised (SFT) loss that imitates
a baseline distribution, here the chosen responses y_w of the preference data::

    L_RPO(θ) = E_D[ −log σ(β h) ]  +  η · β · E_D[ −log π_θ(y_w | x) ]

with ``h`` DPO's difference of log-ratios and ``log π_θ(y_w | x)`` the *sum* of the response
tokens' log-probabilities (the "cumulative SFT loss" of the paper's main text). The official
code (YSLIU627/Regularized-Preference-Optimization @ 088d921,
``alignment-handbook/scripts/rpo_trainer.py``, ``dpo_loss``) subtracts
``policy_chosen_logps * beta * eta`` from DPO's per-pair loss, ``policy_chosen_logps`` being
the summed response log-probability; its zephyr recipe uses η = 0.005 with β = 0.01.

The "average SFT loss" variant (the repository's OpenRLHF code, reported in the paper's
Appendix F; the README calls it generally better) takes the per-response *mean* over tokens
and weights it by η alone (``loss = preference_loss + nll_loss * nll_loss_coef``, with
``nll_loss = −mean_i (Σ_t log π_θ(y_w,t) / |y_w|)``; ``train_rpo.sh``: η = 0.2, β = 0.5)::

    L_RPO-avg(θ) = E_D[ −log σ(β h) ]  +  η · E_D[ −(1/|y_w|) log π_θ(y_w | x) ]
"""

from __future__ import annotations

from typing import Literal

import torch


def sft_term(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    beta: float,
    eta: float,
    normalize: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """The SFT regularizer per pair, ``[B]``: ``η β (−Σ_t log π_θ(y_w,t))`` or ``η (−mean_t …)``.

    :param chosen_token_logps: ``[B, T]`` log-probabilities of the chosen responses' tokens
        (0 off the response).
    :param chosen_mask: ``[B, T]``, 1 on the response tokens whose log-probability counts
        (never the prompt or padding).
    :param beta: β of DPO (multiplies the ``sum`` form only, as in the official code).
    :param eta: η.
    :param normalize: ``sum`` (the paper's main text) or ``mean`` (per response, OpenRLHF).
    """
    mask = chosen_mask.to(chosen_token_logps.dtype)
    total = (chosen_token_logps * mask).sum(1)  # log π_θ(y_w | x), [B]
    if normalize == "sum":
        return -eta * beta * total
    if normalize == "mean":
        return -eta * total / mask.sum(1).clamp_min(1.0)
    raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")


__all__ = ["sft_term"]
