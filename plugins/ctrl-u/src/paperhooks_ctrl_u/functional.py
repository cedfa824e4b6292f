"""Uncertainty-aware loss of Ctrl-U (Zhang et al., 2024), as pure torch functions.

"Ctrl-U: Robust Conditional Image Generation via Uncertainty-aware Reward Modeling"
(arXiv 2410.11236), Eq. 4 in the form of the authors' code, ``train/ctrlu-reward.py``
(segmentation) and ``train/ctrlu-depth.py`` (depth) of grenoble-zhang/Ctrl-U.

Two predictions of one sample, o (primary) and o' (auxiliary), disagree by U; the sample's
loss ℓ is weighted by exp(−U) and U is penalized, with U **not** detached (gradients flow
through exp(−U) and through the penalty into both predictions)::

    kl   U = λ · Σ_c p'_c (log p'_c − log p_c),  p = softmax(o), p' = softmax(o')
         o_i = ℓ_i · exp(−U_i) + U_i                       (segmentation form: λ inside U)
    l1   U = |o − o'|
         o_i = ℓ_i · exp(−U_i) + λ · U_i                   (depth form: λ on the penalty)

λ is the official ``u_scale`` (default 0.1). The code averages ``o`` over pixels and samples;
here every sample has one U (the mean over its positions when outputs have more than one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PLUGIN = "ctrl-u"
U_MAX = 50.0
"""U beyond which exp(−U) is held at exp(−50) ≈ 2e-22: such a sample already weighs nothing
next to others, and the cap keeps 1 / exp(−U) (used by :func:`penalty_term`) finite."""


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` naming the plugin when ``values`` hold NaN or inf."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{PLUGIN}: {bad} of {values.numel()} {what} are NaN or inf")


def _per_sample(u: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``u`` ``[B, ...]`` over all non-batch dims (over ``mask`` where given, ``[B, T]``)."""
    if u.dim() == 1:
        return u
    if mask is not None and mask.shape == u.shape:
        m = mask.to(u.dtype)
        return (u * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return u.reshape(u.shape[0], -1).mean(dim=1)


def kl_uncertainty(
    primary: torch.Tensor,
    auxiliary: torch.Tensor,
    u_scale: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """U = λ·KL(softmax(o') ‖ softmax(o)) over the class dim (last), per sample.

    The official ``KLDivLoss(reduction="none")(log_softmax(o_prim), softmax(o_aux))``, summed
    over classes and times ``u_scale``. Both arguments keep their gradients.

    :param primary: logits o, shape ``[B, C]`` or ``[B, ..., C]``.
    :param auxiliary: logits o' of the second prediction, same shape.
    :param mask: optional ``[B, T]`` mask of the positions of ``[B, T, C]`` logits.
    :return: U, shape ``[B]``, >= 0.
    """
    if primary.shape != auxiliary.shape:
        raise ValueError(
            f"{PLUGIN}: the two predictions differ in shape: {tuple(primary.shape)} vs {tuple(auxiliary.shape)}"
        )
    log_p = F.log_softmax(primary.float(), dim=-1)
    p_aux = F.softmax(auxiliary.float(), dim=-1)
    kl = F.kl_div(log_p, p_aux, reduction="none").sum(dim=-1)  # [B, ...]: Σ_c p'(log p' − log p)
    return u_scale * _per_sample(kl, mask)


def l1_uncertainty(
    primary: torch.Tensor, auxiliary: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """U = |o − o'|, per sample (mean over the other dims), as the depth/HED/lineart code.

    :param primary: predictions o, shape ``[B]`` or ``[B, ...]``.
    :param auxiliary: the second predictions o', same shape.
    :return: U, shape ``[B]``, >= 0.
    """
    if primary.shape != auxiliary.shape:
        raise ValueError(
            f"{PLUGIN}: the two predictions differ in shape: {tuple(primary.shape)} vs {tuple(auxiliary.shape)}"
        )
    return _per_sample((primary.float() - auxiliary.float()).abs(), mask)


def uncertainty_weights(u: torch.Tensor) -> torch.Tensor:
    """w = exp(−U) (with U capped at :data:`U_MAX`); keeps the gradient of U."""
    return torch.exp(-u.clamp(max=U_MAX))


def penalty_term(u: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """t with ``w_i t_i = scale · U_i`` in value *and* gradient, w = :func:`uncertainty_weights`.

    The paperhooks core multiplies every per-sample objective by the sample weights, so the
    penalty ``scale · U_i``, which Ctrl-U adds unweighted, is handed over divided by w. A
    plain ``scale · U_i / w_i`` would also pass gradient through w; the slope below cancels
    it, so that ∂(w_i t_i)/∂U_i = scale (for U_i < U_MAX, where ∂w/∂U = −w, and above it,
    where w is constant).

    :param u: U ``[B]``, with its gradient. :param w: w ``[B]`` from U (with gradient).
    :param scale: the penalty's coefficient (1 for ``kl``, λ for ``l1``).
    :return: t ``[B]``.
    """
    u_d, w_d = u.detach(), w.detach()
    through_w = (u_d < U_MAX).to(u.dtype)  # 1 where ∂w/∂U = −w, 0 where U is capped
    return (scale / w_d) * (u_d + (1.0 + u_d * through_w) * (u - u_d))


def ctrl_u_objective(losses: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """The per-sample Ctrl-U objective o_i = ℓ_i·exp(−U_i) + scale·U_i (reference form)."""
    return losses * uncertainty_weights(u) + scale * u


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(Σ w)² / Σ w²: B when all weights are equal."""
    return w.sum() ** 2 / (w**2).sum()


__all__ = [
    "PLUGIN",
    "U_MAX",
    "check_finite",
    "ctrl_u_objective",
    "effective_sample_size",
    "kl_uncertainty",
    "l1_uncertainty",
    "penalty_term",
    "uncertainty_weights",
]
