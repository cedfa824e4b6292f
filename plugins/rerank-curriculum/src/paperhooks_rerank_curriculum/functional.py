"""Curriculum weights of MacAvaney et al., SIGIR 2020, as pure torch functions.

"Training Curricula for Open Domain Answer Re-Ranking" (arXiv 2004.14269). Formulas and
defaults checked against the authors' code, ``onir/trainers/pointwise_cl.py`` and
``onir/trainers/pairwise_cl.py`` of Georgetown-IR-Lab/OpenNIR (the paper's repository,
Georgetown-IR-Lab/curricula-neural-ir, points there).

Notation. A cheap first-stage ranker (BM25 in the paper) gives each training pair (q, d) a
heuristic score h ∈ [0, 1] that is high when the ranker thinks d relevant to q::

    reciprank   h = 1 / rank(q, d)           (rank in the first-stage list, 1-based)
    normscore   h = the normalized ranker score (precomputed by the dataset)
    kdescore    h = the KDE-based score     (precomputed by the dataset)

A sample is easy when the heuristic agrees with its label. The difficulty weight D ∈ [0, 1]
(1 = easiest) is, with ε = 1e-8 (the code's "smooth")::

    pointwise   D(q, d)            = h        if d is relevant,  1 − h  otherwise       (+ ε)
    pairwise    D(q, d⁺, d⁻₁..ₙ)   = min_j (h(d⁺) − h(d⁻_j) + 1) / 2                    (+ ε)
    anti        D ← 1 − D      (before ε; the inverse curriculum, hard samples first)

and the curriculum weight at training iteration i, with m the end of the curriculum::

    W = D + (i / m)(1 − D)  =  D (1 − i/m) + i/m      for i < m,      W = 1  for i ≥ m.
"""

from __future__ import annotations

import torch

PLUGIN = "rerank-curriculum"
SMOOTH = 1e-8  # the official "weight + 1e-8 # smooth": no sample gets weight exactly 0
HEURISTICS = ("reciprank", "normscore", "kdescore")
"""The paper's three difficulty heuristics (the official ``curriculum`` choices)."""


def check_finite(losses: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the plugin when ``losses`` hold NaN or inf."""
    if not bool(torch.isfinite(losses).all()):
        bad = int((~torch.isfinite(losses)).sum())
        raise ValueError(
            f"{PLUGIN}: {bad} of {losses.numel()} per-sample losses are NaN or inf; "
            "training on them with any weight is undefined"
        )


def reciprocal_rank(rank: torch.Tensor) -> torch.Tensor:
    """h = 1 / rank, the reciprocal-rank heuristic; ``rank`` is 1-based (1 = top of the list)."""
    rank = rank.to(torch.float32) if not rank.is_floating_point() else rank
    if not bool((rank >= 1).all()):
        raise ValueError(f"{PLUGIN}: ranks must be >= 1 (1-based), got min {rank.min().item()!r}")
    return 1.0 / rank


def check_heuristic(h: torch.Tensor, name: str) -> torch.Tensor:
    """``h`` as a float tensor, after checking that it lies in [0, 1]."""
    h = h if h.is_floating_point() else h.to(torch.float32)
    if not bool(((h >= 0) & (h <= 1)).all()):
        raise ValueError(
            f"{PLUGIN}: heuristic {name!r} must lie in [0, 1], got values in "
            f"[{h.min().item():.4g}, {h.max().item():.4g}]"
        )
    return h


def pointwise_difficulty(
    h: torch.Tensor, relevant: torch.Tensor, anti: bool = False
) -> torch.Tensor:
    """D of single (q, d) samples: h for relevant documents, 1 − h for the others, plus ε.

    :param h: heuristic scores, shape ``[B]``, in [0, 1].
    :param relevant: bool ``[B]`` (the official code uses ``relscore > 0``).
    :param anti: the inverse curriculum: h ← 1 − h first, hence D ← 1 − D.
    :return: D, shape ``[B]``, in [ε, 1 + ε].
    """
    if anti:
        h = 1.0 - h
    return torch.where(relevant, h, 1.0 - h) + SMOOTH


def pairwise_difficulty(h: torch.Tensor, anti: bool = False) -> torch.Tensor:
    """D of training records (one relevant document, n non-relevant ones).

    :param h: heuristic scores, shape ``[B, 1 + n]``: column 0 is the relevant document d⁺,
        columns 1..n the non-relevant d⁻_j, all in [0, 1].
    :param anti: the inverse curriculum, D ← 1 − D.
    :return: D = min_j (h⁺ − h⁻_j + 1) / 2 (+ ε), shape ``[B]``: 1 when the ranker puts d⁺ far
        above every d⁻, 0 when it puts some d⁻ far above d⁺.
    """
    if h.dim() != 2 or h.shape[1] < 2:
        raise ValueError(
            f"{PLUGIN}: pairwise scores need shape [B, 1 + n] with n >= 1, got {tuple(h.shape)}"
        )
    per_negative = (h[:, :1] - h[:, 1:] + 1.0) / 2.0  # [B, n]
    d = per_negative.min(dim=1).values  # [B]
    if anti:
        d = 1.0 - d
    return d + SMOOTH


def curriculum_weight(difficulty: torch.Tensor, progress: float) -> torch.Tensor:
    """W = D (1 − p) + p with p = i/m; all ones once p ≥ 1 (the curriculum has ended).

    :param difficulty: D, shape ``[B]``.
    :param progress: p = i / m, the fraction of the curriculum done (>= 0).
    """
    if progress < 0:
        raise ValueError(f"{PLUGIN}: curriculum progress must be >= 0, got {progress!r}")
    if progress >= 1:
        return torch.ones_like(difficulty)
    return difficulty * (1.0 - progress) + progress


__all__ = [
    "HEURISTICS",
    "PLUGIN",
    "SMOOTH",
    "check_finite",
    "check_heuristic",
    "curriculum_weight",
    "pairwise_difficulty",
    "pointwise_difficulty",
    "reciprocal_rank",
]
