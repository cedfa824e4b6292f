"""``rd-pruning`` as pure torch functions: layer-adaptive sparsity by joint rate-distortion optimization.

Xu, Wang, Geng, Wu, Li, Lin, *Efficient Joint Optimization of Layer-Adaptive Weight Pruning
in Deep Neural Networks* (ICCV 2023, arXiv 2308.10438); official code Akimoto-Cris/RD_PRUNE
(``tools/pruners.py``: ``gen_rd_curves``; ``tools/algo.py``: ``dp_pruning``).

Notation. Layers l = 1..L with n_l weights; the network output on calibration input X is
Y = f(X) (the current, already-masked network) and Ŷ the output with some layers pruned
further. The paper minimizes the output distortion under a rate (kept-weight) budget::

    min_{a_1..a_L}  ‖Y − Ŷ(a_1, …, a_L)‖²     s.t.  Σ_l n_l (1 − a_l) = K        (problem (1))

Its additivity property (Taylor expansion; cross terms vanish in expectation) makes the
joint distortion the sum of the single-layer distortions::

    ‖Y − Ŷ(a_1, …, a_L)‖² ≈ Σ_l δ_l(a_l),   δ_l(a) = ‖Y − Ŷ(layer l alone pruned by a)‖²

Each δ_l is measured on a grid a_d = d / maxsps, d = 0..maxsps (``maxsps`` = 100 in the
official code), pruning the layer alone by its lowest scores (magnitude, as the code's
``l1`` ranking), with ``δ = mean over samples and outputs of (Y − Ŷ)²`` (or, with
``worst_case``, the per-sample mean's max over samples, ``--worst_case_curve``).

Dynamic programming over layers (sorted by size as in ``dp_pruning``) and the number of
surviving weights s::

    D_1(s) = δ_1(k⁻¹(s)),   D_l(s) = min_d [ δ_l(a_d) + D_{l−1}(s − k_l(a_d)) ],
    k_l(a) = n_l − (pruned count of a)

and backtracking from D_L(K) gives every layer's amount. paperhooks asks the budget to be
met *exactly* (``round(s·N)`` pruned, as ``torch.nn.utils.prune`` counts), which a grid alone
cannot reach; so the last layer of the DP (the largest) takes every integer kept count, its
δ linearly interpolated between grid points. The official code instead keeps
``s ≤ int((1 − s)·N)`` survivors and lands within one grid step of the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grid_pruned_counts(n: int, dead: int, maxsps: int) -> torch.Tensor:
    """Pruned counts of the grid a_d = d/maxsps: ``round(a_d·n)``, at least the ``dead`` entries
    already pruned (pruned weights stay pruned; the code's ``rd_phi ≥ prev_pc``). ``[maxsps+1]``."""
    a = torch.arange(maxsps + 1, dtype=torch.float64) / maxsps
    return torch.round(a * n).to(torch.int64).clamp(min=dead, max=n)


def distortion(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Per-sample output distortion: mean over the output dims of (Y − Ŷ)², ``[B]`` in float64.

    The paper's δ is the mean of these over the calibration samples (the code's
    ``((Y − Y_hat) ** 2).mean()``), or their max with ``worst_case``.
    """
    d = (y.double() - y_hat.double()).square()
    return d.reshape(d.shape[0], -1).mean(dim=1)


def interpolate(
    kept_grid: torch.Tensor, dist_grid: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """δ at integer kept counts ``kept``, piecewise-linear between the grid points (float64).

    ``kept_grid`` may repeat a count (grid points clamped at the dead entries); repeated
    points hold the same masks, hence the same distortion, and the first is used.
    """
    order = torch.argsort(kept_grid, stable=True)
    xs, ys = kept_grid[order].double(), dist_grid[order].double()
    first = torch.ones_like(xs, dtype=torch.bool)
    first[1:] = xs[1:] != xs[:-1]
    xs, ys = xs[first], ys[first]
    k = kept.double()
    if xs.numel() == 1:
        return ys.expand_as(k).clone()
    i = torch.searchsorted(xs, k, right=True).clamp(1, xs.numel() - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (k - x0) / (x1 - x0)


def dp_allocation(
    kept_grid: Sequence[torch.Tensor],
    dist_grid: Sequence[torch.Tensor],
    alive: Sequence[int],
    budget: int,
) -> list[int]:
    """Kept count of every layer, summing to ``budget`` exactly, minimizing Σ_l δ_l.

    :param kept_grid: per layer, ``[G_l]`` int64 kept counts of the grid (n_l − pruned count).
    :param dist_grid: per layer, ``[G_l]`` distortions δ_l at those counts.
    :param alive: per layer, the entries not yet pruned (an upper bound on its kept count).
    :param budget: K, the total number of weights kept.
    :return: kept count of each layer, in the given order.

    Layers are taken in increasing ``alive`` order (stable; the code sorts by size); the last
    one takes any integer count in [0, alive_L] with δ interpolated (:func:`interpolate`), so
    K is met exactly. Ties go to the smaller grid index (fewer pruned), then the smaller
    kept count of the last layer. Cost O(L·K·G) time, O(L·K) memory for the backtracking.
    """
    n_layers = len(kept_grid)
    if not n_layers:
        raise ValueError("dp_allocation: no layer")
    if not 0 <= budget <= sum(alive):
        raise ValueError(
            f"dp_allocation: budget {budget} outside [0, {sum(alive)}] (the entries not yet pruned)"
        )
    order = sorted(range(n_layers), key=lambda i: alive[i])
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    best = torch.full((budget + 1,), float("inf"), dtype=torch.float64)  # D_0: 0 kept costs 0
    best[0] = 0.0
    choices: list[torch.Tensor] = []
    for li in order[:-1]:
        ks, ds = kept_grid[li].to(torch.int64), dist_grid[li].double()
        new = torch.full_like(best, float("inf"))
        arg = torch.full((budget + 1,), -1, dtype=torch.int64)
        for d in range(ks.numel()):
            k = int(ks[d])
            if k > budget:
                continue
            cand = torch.full_like(best, float("inf"))
            cand[k:] = ds[d] + best[: budget + 1 - k]
            better = cand < new  # strict: the earlier grid index wins a tie
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, d), arg)
        best = new
        choices.append(arg)
    last = order[-1]
    top = min(alive[last], budget)
    kept_last = torch.arange(top + 1)
    total = interpolate(kept_grid[last], dist_grid[last], kept_last) + best[budget - kept_last]
    total = torch.where(torch.isnan(total), inf, total)
    j = int(torch.argmin(total))
    if not torch.isfinite(total[j]):
        raise ValueError(
            f"dp_allocation: no grid combination reaches {budget} kept weights exactly; use a finer grid (maxsps)"
        )
    out = [0] * n_layers
    out[last] = j
    s = budget - j
    for li, arg in zip(reversed(order[:-1]), reversed(choices), strict=True):
        d = int(arg[s])
        out[li] = int(kept_grid[li][d])
        s -= out[li]
    assert s == 0 and sum(out) == budget
    return out


def brute_force_allocation(
    kept_grid: Sequence[torch.Tensor],
    dist_grid: Sequence[torch.Tensor],
    alive: Sequence[int],
    budget: int,
) -> tuple[list[int], float]:
    """Exhaustive search over the same choices as :func:`dp_allocation` (hand-sized cases only):
    every grid point of each layer but the last in ``alive`` order, every integer count of that
    one. Returns the kept counts of the smallest total distortion and that total."""
    import itertools

    order = sorted(range(len(kept_grid)), key=lambda i: alive[i])
    last = order[-1]
    best: tuple[float, list[int]] | None = None
    for combo in itertools.product(*(range(kept_grid[i].numel()) for i in order[:-1])):
        kept = {i: int(kept_grid[i][d]) for i, d in zip(order[:-1], combo, strict=True)}
        rest = budget - sum(kept.values())
        if not 0 <= rest <= alive[last]:
            continue
        kept[last] = rest
        total = sum(float(dist_grid[i][d]) for i, d in zip(order[:-1], combo, strict=True))
        total += float(interpolate(kept_grid[last], dist_grid[last], torch.tensor([rest]))[0])
        if best is None or total < best[0]:
            best = (total, [kept[i] for i in range(len(kept_grid))])
    if best is None:
        raise ValueError("brute_force_allocation: the budget is unreachable")
    return best[1], best[0]


def keep_top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Boolean mask of the ``kept`` highest scores (stable: of equal scores the earlier is kept)."""
    flat = scores.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[order[:kept]] = True
    return out.view_as(scores)


__all__ = [
    "brute_force_allocation",
    "distortion",
    "dp_allocation",
    "grid_pruned_counts",
    "interpolate",
    "keep_top",
]
