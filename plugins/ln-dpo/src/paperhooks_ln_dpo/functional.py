"""LN-DPO (length-normalized DPO) as pure torch functions.

"The Hitchhiker's Guide to Human Alignment with *PO", Ahrabian et al., arXiv 2407.15229
(NAACL 2025 Findings as "A Practical Analysis of Human Alignment with *PO"). The paper's
method, LN-DPO, is DPO (Rafailov et al. 2023, eq. 7) with each response's log-ratio divided by
its length. For a pair ``(x, y_w, y_l)``::

    ℓ_w = log π_θ(y_w|x) − log π_ref(y_w|x)        (summed over the |y_w| response tokens)
    ℓ_l = log π_θ(y_l|x) − log π_ref(y_l|x)
    h   = ℓ_w / |y_w| − ℓ_l / |y_l|                (per-token mean log-ratios)
    L_LN-DPO = −log σ(β · h)

β multiplies the whole difference, so ``β·h = (β/|y_w|)·ℓ_w − (β/|y_l|)·ℓ_l``: where β sits
relative to the normalization does not matter. |y| is the number of response tokens whose
log-probability counts (the response mask: the content tokens and the closing EOS, never the
prompt or padding). This is TRL's ``DPOTrainer`` loss type ``sigmoid_norm`` (its normalizer is
the completion-mask count), which the tests check numerically.

Provenance: the paper's own equation could not be read (only the abstract was reachable); the
formula above is the one the abstract names ("a simple length-normalized version of DPO"),
the project's paper notes, and TRL's ``sigmoid_norm`` (TRL PR #5406, citing the Tülu 3 report,
arXiv 2411.15124, eq. 6). See the method card.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_log_ratio_margin(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_length: torch.Tensor,
    rejected_length: torch.Tensor,
) -> torch.Tensor:
    """h = ℓ_w/|y_w| − ℓ_l/|y_l|, shape ``[B]``.

    :param chosen_logps: log π_θ(y_w|x) summed over the response tokens, ``[B]``.
    :param rejected_logps: log π_θ(y_l|x), ``[B]``.
    :param ref_chosen_logps: log π_ref(y_w|x), ``[B]`` (0 for a reference-free run).
    :param ref_rejected_logps: log π_ref(y_l|x), ``[B]``.
    :param chosen_length: |y_w|, the number of response tokens, ``[B]`` (clamped to ≥ 1).
    :param rejected_length: |y_l|, ``[B]``.
    """
    w = (chosen_logps - ref_chosen_logps) / chosen_length.clamp_min(1)
    lo = (rejected_logps - ref_rejected_logps) / rejected_length.clamp_min(1)
    return w - lo


def ln_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_length: torch.Tensor,
    rejected_length: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """L_LN-DPO = −log σ(β · (ℓ_w/|y_w| − ℓ_l/|y_l|)) per pair, shape ``[B]``.

    Arguments as in :func:`normalized_log_ratio_margin`; ``beta`` is β > 0.
    """
    h = normalized_log_ratio_margin(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_length,
        rejected_length,
    )
    return -F.logsigmoid(beta * h)


__all__ = ["ln_dpo_loss", "normalized_log_ratio_margin"]
