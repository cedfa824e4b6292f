"""Sparse Model Soups (Zimmer, Spiegel & Pokutta, ICLR 2024, arXiv 2306.16788), the schedules.

SMS is iterative magnitude pruning (IMP) in ``n_phases`` prune–retrain phases to a goal
sparsity ``s``; every phase retrains several *ingredients* from the same pruned model and
passes on their average (the *soup*). The averaging, the greedy soup and the BatchNorm
recalibration are the core's soup stages (:mod:`paperhooks.stages`); this module holds what
the method adds on top, in the notation of the official code (``ZIB-IOL/SMS``):

- the IMP phase schedule (``strategies/strategies.py``, ``IMP.at_train_end``): each phase
  prunes the fraction ``prune_per_phase = 1 − (1 − s)^{1/n_phases}`` of the weights that
  remain, by global L1 magnitude (``prune.global_unstructured(..., L1Unstructured)``), so the
  sparsity after phase k is ``1 − (1 − s)^{k/n_phases}``;
- the LLR retraining schedule (``runners/baseRunner.py``, ``define_retrain_schedule``, the
  default ``retrain_schedule``): 10 % of the phase's iterations a cosine ramp from 0 to the
  largest learning rate η of the original run, then a linear decay to 0.
"""

from __future__ import annotations

import math


def per_phase_fraction(goal_sparsity: float, n_phases: int) -> float:
    """``prune_per_phase = 1 − (1 − s)^{1/n_phases}``: the fraction of the *remaining* weights
    each phase prunes, so that n_phases phases reach s ("Sparsity factor on remaining weights
    after each round, yields desired_sparsity after all rounds")."""
    return 1.0 - (1.0 - goal_sparsity) ** (1.0 / n_phases)


def phase_sparsity(goal_sparsity: float, n_phases: int, phase: int) -> float:
    """Sparsity after phase k (0 ≤ k ≤ n_phases): ``1 − (1 − s)^{k/n_phases}``
    (the code's ``current_sparsity = 1 − (1 − prune_per_phase)^phase``)."""
    return 1.0 - (1.0 - per_phase_fraction(goal_sparsity, n_phases)) ** phase


def pruned_after_phase(n: int, pruned: int, goal_sparsity: float, n_phases: int) -> int:
    """How many of ``n`` weights are pruned after one more phase, from ``pruned`` pruned now.

    ``torch.nn.utils.prune`` counts as SMS prunes: ``global_unstructured`` on weights that
    already carry masks prunes ``round(amount · remaining)`` of the ``remaining`` unpruned
    entries (``PruningContainer``), with ``amount = prune_per_phase``.
    """
    return pruned + round(per_phase_fraction(goal_sparsity, n_phases) * (n - pruned))


def pruned_counts(n: int, goal_sparsity: float, n_phases: int) -> list[int]:
    """The pruned counts c_0 = 0, c_1, …, c_{n_phases} of ``n`` weights through the phases."""
    counts = [0]
    for _ in range(n_phases):
        counts.append(pruned_after_phase(n, counts[-1], goal_sparsity, n_phases))
    return counts


def llr_factor(t: int, total: int, warmup_fraction: float = 0.1) -> float:
    """LLR ("linear from the largest original lr to 0, maxLR init, 10% warmup") at iteration t.

    With T = ``total`` iterations of the phase and W = int(warmup_fraction·T) warm-up
    iterations (the code's ``int(0.1 * n_total_iterations)``), the learning rate of
    iteration t is η times::

        (1 − cos(π t / W)) / 2      for t < W   (CosineAnnealingLR from 0 up to η, T_max = W)
        (T − t) / (T − W)           for t ≥ W   (LinearLR from η to 0 over T − W iterations)

    Both pieces give 1 at t = W; without warm-up (W = 0) it is (T − t)/T. Iterations past T
    get 0.
    """
    if total <= 0 or t >= total:
        return 0.0
    w = int(warmup_fraction * total)
    if t < w:
        return (1.0 - math.cos(math.pi * t / w)) / 2.0
    return (total - t) / (total - w)


__all__ = [
    "llr_factor",
    "per_phase_fraction",
    "phase_sparsity",
    "pruned_after_phase",
    "pruned_counts",
]
