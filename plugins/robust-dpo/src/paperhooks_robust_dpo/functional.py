"""rDPO as pure torch functions (Chowdhury, Kini & Natarajan, ICML 2024, arXiv 2403.00409).

The setting (§3 of the paper): each preference label of the training set is flipped
independently with a known probability ε < 1/2 (random noise, the same for every pair).
DPO's loss on a pair ``(x, y_w, y_l)`` is, with the log-ratio difference
``h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]``::

    ℓ(θ; x, y_w, y_l) = −log σ(β h)           and, labels swapped,   ℓ(θ; x, y_l, y_w) = −log σ(−β h)

rDPO replaces it by the de-biased loss (the paper's robust loss ℓ̂_ε)::

    ℓ̂_ε(θ; x, y_w, y_l) = [ (1 − ε) ℓ(θ; x, y_w, y_l) − ε ℓ(θ; x, y_l, y_w) ] / (1 − 2ε)
                         = [ −(1 − ε) log σ(β h) + ε log σ(−β h) ] / (1 − 2ε)

Unbiasedness: if the observed label is the true one with probability 1 − ε and swapped with
probability ε, then ``E[ℓ̂_ε(observed)] = ℓ(true)`` for every θ, because
``(1 − ε) ℓ̂_ε(h) + ε ℓ̂_ε(−h) = −log σ(β h)`` (an identity in h; the ε² and ε(1 − ε)
cross terms cancel). With ε = 0 it is DPO. It is what TRL's ``DPOTrainer`` computes for
``loss_type="robust"`` with ``label_smoothing = ε`` (checked numerically in the tests).

Unlike cDPO (conservative DPO, label smoothing ``(1 − ε) ℓ(h) + ε ℓ(−h)``, bounded below),
ℓ̂_ε is not bounded below in h: for h → +∞ it decreases like ``−ε β h / (1 − 2ε)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def robust_dpo_loss(h: torch.Tensor, beta: float, epsilon: float) -> torch.Tensor:
    """ℓ̂_ε per pair, from the log-ratio differences ``h`` ``[B]``.

    :param h: ``h`` of each pair, shape ``[B]`` (sequence log-probabilities summed over the
        response tokens; see :func:`paperhooks.preference.log_ratio_margin`).
    :param beta: β of DPO.
    :param epsilon: ε ∈ [0, ½), the assumed label-flip rate.
    :return: ``[B]``, differentiable in h.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon!r}")
    clean = -F.logsigmoid(beta * h)  # ℓ(θ; x, y_w, y_l)
    swapped = -F.logsigmoid(-beta * h)  # ℓ(θ; x, y_l, y_w)
    return ((1.0 - epsilon) * clean - epsilon * swapped) / (1.0 - 2.0 * epsilon)


def gradient_weight(h: torch.Tensor, beta: float, epsilon: float) -> torch.Tensor:
    """−∂ℓ̂_ε/∂h per pair: ``β [(1 − ε) σ(−β h) + ε σ(β h)] / (1 − 2ε)`` (DPO: ``β σ(−β h)``).

    Every pair is pushed towards its observed label (the weight is positive); pairs the model
    already ranks confidently against their label get up to ``(1 − ε)/(1 − 2ε)`` times β.
    """
    return (
        beta
        * ((1.0 - epsilon) * torch.sigmoid(-beta * h) + epsilon * torch.sigmoid(beta * h))
        / (1.0 - 2.0 * epsilon)
    )


__all__ = ["gradient_weight", "robust_dpo_loss"]
