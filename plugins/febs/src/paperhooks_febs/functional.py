"""Fair Error-Bound Scaling (FEBS) and the equity-scaled metric of FairSeg, as pure torch.

Tian, Shi, Luo, Kouhana, Elze, Wang, "FairSeg: A Large-Scale Medical Image Segmentation
Dataset for Fairness Learning Using Segment Anything Model with Fair Error-Bound Scaling"
(ICLR 2024, arXiv 2311.02189). Formulas and defaults from the official code,
Harvard-Ophthalmology-AI-Lab/FairSeg: ``TransUNet/utils.py`` (``febs_loss``,
``equity_scaled_perf``, ``equity_scaled_std_perf``) and ``TransUNet/trainer_febs.py``.

Notation: samples i with identity group a_i ∈ {0…G−1}, classes c ∈ {0…C−1} (background
included), softmax probabilities p_ic and one-hot targets t_ic at every pixel (a classifier is
a one-pixel segmenter). Soft Dice loss of class c over a set of samples::

    dice_c = 1 − (2 Σ p t + s) / (Σ p² + Σ t² + s),   s = 1e-5

FEBS, once per batch (the *global* batch here: sums over all ranks)::

    L_a  = Σ_c dice_c over the samples of group a             (the group's training error)
    w_a  = tanh((min_b L_b / L_a)^γ)                          (no gradient through w)
    L_FEBS = (1/C) Σ_c [1 − (2 Σ_i w_{a_i} p_ic t_ic + s) / (Σ_i w²_{a_i} p²_ic + Σ_i t²_ic + s)]

The best group gets w = tanh(1) ≈ 0.762; a group with a larger error gets a smaller w, so its
predictions are scaled down and its Dice can no longer reach 0: its error bound is raised,
and its samples keep a gradient after the best group has converged. The training loss of the
code is 0.5·CE + 0.5·L_FEBS. Equity-scaled performance, for a per-sample metric (Dice, accuracy)::

    ES = overall / (1 + α Σ_a |perf_a − overall|)     (or α·std_a(perf_a): the "std" variant)
"""

from __future__ import annotations

from typing import Literal

import torch

PLUGIN = "febs"
SMOOTH = 1e-5  # the official _dice_loss
Absent = Literal["skip", "count"]


def per_sample_sums(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's Dice sums per class: ``[B, C, 3]`` = (Σ p t, Σ p², Σ t²) over its pixels.

    :param probs: softmax probabilities, ``[B, C]`` or ``[B, C, *spatial]``.
    :param target: class indices, ``[B]`` or ``[B, *spatial]``.
    """
    if probs.dim() < 2 or target.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"{PLUGIN}: probabilities [B, C, ...] {tuple(probs.shape)} and targets [B, ...] "
            f"{tuple(target.shape)} do not match"
        )
    t = (
        torch.nn.functional.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    )  # [B, C, ...]
    dims = tuple(range(2, probs.dim()))

    def total(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=dims) if dims else x

    return torch.stack([total(probs * t), total(probs * probs), total(t * t)], dim=-1)


def group_sums(sums: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Σ over the samples of each group: ``[G, C, 3]`` from per-sample ``[B, C, 3]``."""
    out = sums.new_zeros((num_groups, *sums.shape[1:]))
    return out.index_add(0, group, sums)


def dice(S: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """dice_c = 1 − (2I + s)/(Z + Y + s) for sums ``S[..., (I, Z, Y)]`` = (Σ p t, Σ p², Σ t²).

    :return: shape ``S.shape[:-1]``.
    """
    inter, Z, Y = S.unbind(-1)
    return 1.0 - (2.0 * inter + smooth) / (Z + Y + smooth)


def group_losses(
    S: torch.Tensor, absent: Absent = "skip", smooth: float = SMOOTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_a, each group's unscaled Dice loss, and which groups have samples.

    :param S: group sums ``[G, C, 3]``.
    :param absent: ``count`` sums dice_c over every class, as the official code does;
        ``skip`` averages over the classes the group's samples contain (Σ t² > 0). Where every
        class occurs in every group (FairSeg: background, rim and cup in every image) the two
        differ by the factor C only, which w_a does not see. With one label per sample a class
        missing from a group has dice_c ≈ 1 (no target, some predicted mass), and ``count``
        would measure which classes a group lacks rather than its error.
    :return: L ``[G]`` and the mask of groups present ``[G]`` (L of an absent group is 0).
    """
    d = dice(S, smooth)  # [G, C]
    has_class = S[..., 2] > 0  # [G, C]
    present = has_class.any(dim=1)  # [G]: one-hot targets put mass in some class for any pixel
    if absent == "count":
        L = d.sum(dim=1)
    elif absent == "skip":
        L = (d * has_class).sum(dim=1) / has_class.sum(dim=1).clamp_min(1)
    else:
        raise ValueError(f"{PLUGIN}: absent must be one of skip, count, got {absent!r}")
    return torch.where(present, L, torch.zeros_like(L)), present


def febs_weights(L: torch.Tensor, present: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """w_a = tanh((min_b L_b / L_a)^γ), the min over the groups present.

    The official code takes the min over every group slot, so a group missing from the batch
    (L = 0) sets every weight to tanh(0) = 0; here absent groups are left out of the min (and
    get tanh(1), unused). A group at the minimum gets ratio 1, also when L = 0.

    :return: w ``[G]`` in (0, tanh 1].
    """
    if not bool(present.any()):
        return torch.full_like(L, torch.tanh(torch.tensor(1.0)).item())
    low = L[present].min()
    ratio = torch.where(L > low, low / L.clamp_min(torch.finfo(L.dtype).tiny), torch.ones_like(L))
    return torch.tanh(ratio.pow(gamma))


def febs_dice(S: torch.Tensor, w: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """L_FEBS from group sums ``[G, C, 3]`` and group weights ``[G]`` (a scalar).

    Scaling the predictions of group a by w_a scales its Σ p t by w_a and its Σ p² by w_a².
    """
    inter = (w[:, None] * S[..., 0]).sum(dim=0)  # Σ w p t, [C]
    Z = (w[:, None] ** 2 * S[..., 1]).sum(dim=0)  # Σ w² p², [C]
    Y = S[..., 2].sum(dim=0)  # Σ t², [C]
    return dice(torch.stack([inter, Z, Y], dim=-1), smooth).mean()


def febs_value_and_grad(
    S: torch.Tensor, gamma: float = 1.0, absent: Absent = "skip", smooth: float = SMOOTH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_FEBS, ∂L_FEBS/∂S, w and L_a from the group sums of the whole (global) batch.

    w is computed from the detached sums, as in the official code (numpy weights).

    :return: loss ``[]``, grad ``[G, C, 3]``, weights ``[G]``, group losses ``[G]``.
    """
    work = S.detach().to(torch.promote_types(S.dtype, torch.float32))
    L, present = group_losses(work, absent, smooth)
    w = febs_weights(L, present, gamma)
    work.requires_grad_(True)
    with torch.enable_grad():
        loss = febs_dice(work, w, smooth)
        (grad,) = torch.autograd.grad(loss, work)
    return loss.detach(), grad, w, L


def equity_scaled(
    overall: torch.Tensor, per_group: torch.Tensor, alpha: float = 1.0, spread: str = "abs"
) -> torch.Tensor:
    """ES = overall / (1 + α·Δ): Δ = Σ_a |perf_a − overall| (``abs``) or the sample standard
    deviation of perf_a (``std``, n − 1 as ``statistics.stdev``)."""
    if spread == "abs":
        delta = (per_group - overall).abs().sum()
    elif spread == "std":
        delta = per_group.std(unbiased=True) if per_group.numel() > 1 else per_group.new_zeros(())
    else:
        raise ValueError(f"{PLUGIN}: spread must be one of abs, std, got {spread!r}")
    return overall / (1.0 + alpha * delta)


def hard_dice_per_sample(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Per-image Dice of the predicted labels, averaged over the foreground classes 1…C−1.

    Per class, as ``calculate_metric_percase`` of the official code: 2|P∩T|/(|P| + |T|) when
    both are non-empty, 1 when only the prediction is non-empty, 0 otherwise.

    :param pred, target: label maps ``[B, *spatial]``. :return: ``[B]``.
    """
    dims = tuple(range(1, pred.dim()))
    scores = []
    for c in range(1, num_classes):
        P, T = pred == c, target == c
        inter = (P & T).sum(dim=dims).double()
        p, t = P.sum(dim=dims).double(), T.sum(dim=dims).double()
        both = (p > 0) & (t > 0)
        value = torch.where(
            both, 2 * inter / (p + t).clamp_min(1), torch.where(p > 0, 1.0, 0.0).double()
        )
        scores.append(value)
    return torch.stack(scores, dim=1).mean(dim=1)


__all__ = [
    "SMOOTH",
    "dice",
    "equity_scaled",
    "febs_dice",
    "febs_value_and_grad",
    "febs_weights",
    "group_losses",
    "group_sums",
    "hard_dice_per_sample",
    "per_sample_sums",
]
