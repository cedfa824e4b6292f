"""The regularized DPO variants of "3D-Properties" (Yan et al., ICLR 2025, arXiv 2406.07327).

RECONSTRUCTION: the paper's body and code could not be read (stored copies of the arXiv HTML
return only the title, abstract, contents and the start of §1; no code was released). The two
regularizers below are taken from the OpenReview reviews, from review summaries, and from the
paper's TL;DR ("Flex-DPO with adaptive beta and SFT-DPO"); per one review the paper itself
does not write the Flex-DPO loss as an equation (its §3.3 and §4.3). The method card lists
what was and was not verified.

The paper calls its three findings the "3D-properties" of DPO: a Drastic drop of the
rejected likelihood, Degradation into response suppression (the chosen likelihood falls
too), and Dispersion of mass onto unseen responses. Its remedies, for a pair
``(x, y⁺, y⁻)`` with log-ratios ``ℓ± = log π_θ(y±|x) − log π_ref(y±|x)`` (summed over
response tokens):

Flex-DPO, separate coefficients for the chosen and rejected terms (β⁻ < β⁺ damps the
push-down of the rejected response)::

    L_flex = −log σ(β⁺·ℓ⁺ − β⁻·ℓ⁻)          (β⁺ = β⁻ = β: DPO, eq. 7 of Rafailov et al.)

SFT-DPO, DPO plus a negative log-likelihood term on the chosen response::

    L_sft-dpo = L_DPO + λ · NLL(y⁺),   NLL(y⁺) = −log π_θ(y⁺|x)             (reduction "sum")
                                              or −log π_θ(y⁺|x) / |y⁺|      (reduction "mean")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flex_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta_chosen: float,
    beta_rejected: float,
) -> torch.Tensor:
    """L_flex = −log σ(β⁺ ℓ⁺ − β⁻ ℓ⁻) per pair, shape ``[B]``.

    In probability space, (∂L/∂π⁻)/(∂L/∂π⁺) = −(β⁻/β⁺)·π⁺/π⁻: at β⁻ = β⁺ this is the ratio the
    paper derives for DPO (its Corollary 1, per the reviews), whose growth as π⁻ → 0 drives
    the drastic drop; β⁻ < β⁺ scales it down.

    :param chosen_logps: log π_θ(y⁺|x), summed over response tokens, ``[B]``.
    :param rejected_logps: log π_θ(y⁻|x), ``[B]``.
    :param ref_chosen_logps: log π_ref(y⁺|x), ``[B]``.
    :param ref_rejected_logps: log π_ref(y⁻|x), ``[B]``.
    :param beta_chosen: β⁺ > 0.
    :param beta_rejected: β⁻ > 0 (β⁻ = β⁺ gives DPO).
    """
    z = beta_chosen * (chosen_logps - ref_chosen_logps) - beta_rejected * (
        rejected_logps - ref_rejected_logps
    )
    return -F.logsigmoid(z)


def chosen_nll(
    chosen_logps: torch.Tensor, chosen_length: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """NLL(y⁺) per pair, shape ``[B]``: −log π_θ(y⁺|x), divided by |y⁺| for ``mean``.

    :param chosen_logps: log π_θ(y⁺|x), summed over the response tokens, ``[B]``.
    :param chosen_length: |y⁺|, the number of response tokens (content and EOS), ``[B]``.
    :param reduction: ``mean`` (per-token average) or ``sum``.
    """
    if reduction == "sum":
        return -chosen_logps
    if reduction == "mean":
        return -chosen_logps / chosen_length.clamp_min(1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


__all__ = ["chosen_nll", "flex_dpo_loss"]
