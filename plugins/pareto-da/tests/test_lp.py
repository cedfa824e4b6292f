"""ParetoDA's LP: hand-derived solutions, and agreement with the official LP restated.

The official ``EPO_LP.get_alpha`` (``tools/epo_lp_dna.py``, BIT-DA/ParetoDA @ 6691766) builds
its program from the gradients G ``[m, P]`` and G_val ``[P]`` with cvxpy and solves it with
GLPK; :func:`official_program` restates that construction line by line, and a fine grid over
the simplex solves it independently of scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from paperhooks_pareto_da import pareto_alpha

F64 = torch.float64


def alpha_of(G, g_val, loss_val, **kw):
    G, g_val = torch.as_tensor(G, dtype=F64), torch.as_tensor(g_val, dtype=F64)
    return pareto_alpha(G @ G.T, G @ g_val, loss_val, **kw)


# -- the unit check of the notes ----------------------------------------------------------------
@pytest.mark.parametrize(("loss_val", "mode"), [(1.0, "balance"), (-0.5, "dominance")])
def test_orthogonal_unit_gradients_with_a_bisector_held_out_gradient_give_equal_weights(
    loss_val, mode
):
    # g_1 = e_1, g_2 = e_2, g_v = (e_1 + e_2)/√2: C = I, a = [1/√2, 1/√2].
    # balance: αᵀa = 1/√2 for every α ∈ Δ; dominance: 1ᵀCα = 1 for every α ∈ Δ; every
    # constraint holds on all of Δ. The optimum is all of Δ; the tie goes to π/Σπ = [½, ½].
    alpha, got = alpha_of([[1.0, 0.0], [0.0, 1.0]], [2**-0.5, 2**-0.5], loss_val)
    assert got == mode
    assert_close(alpha, torch.tensor([0.5, 0.5], dtype=F64), atol=1e-6, rtol=0)


# -- hand-derived solutions, 2 objectives ------------------------------------------------------------
G2 = [[1.0, 0.0], [-0.5, 1.0]]  # C = [[1, −½], [−½, 5/4]]: the two conflict (⟨g_1, g_2⟩ < 0)


def test_dominance_maximizes_the_descent_of_the_sum_subject_to_no_ascent():
    # g_v = e_2: a = [0, 1] → the held-out constraint is αᵀa ≥ min(1, 0) = 0 (inactive).
    # 1ᵀCα = ½ α_1 + ¾ α_2 = ¾ − ¼ α_1: as small α_1 as allowed.
    # (Cα)_1 = α_1 − ½ α_2 ≥ 0 → α_1 ≥ 1/3;  (Cα)_2 = −½ α_1 + 5/4 α_2 ≥ 0 → α_1 ≤ 5/7.
    # α = [1/3, 2/3]; the update 2α·G = [2/3, 4/3]·G = [0, 4/3] is orthogonal to g_1.
    alpha, mode = alpha_of(G2, [0.0, 1.0], -1.0)
    assert mode == "dominance"
    assert_close(alpha, torch.tensor([1 / 3, 2 / 3], dtype=F64), atol=1e-7, rtol=0)
    d = (2 * alpha) @ torch.tensor(G2, dtype=F64)
    assert_close(d, torch.tensor([0.0, 4 / 3], dtype=F64), atol=1e-7, rtol=0)


def test_balance_follows_the_held_out_gradient_as_far_as_the_constraints_allow():
    # g_v = [1, 0.2]: a = G g_v = [1, −0.3]. a_1 > 0 is the most aligned (j* = 1): (Cα)_1 ≥ 0,
    # i.e. α_1 ≥ 1/3; a_2 ≤ 0: (Cα)_2 ≥ a_2, i.e. −½ α_1 + 5/4 (1 − α_1) ≥ −0.3 → α_1 ≤ 31/35.
    # Objective αᵀa = 1.3 α_1 − 0.3 grows with α_1: α = [31/35, 4/35], where the update
    # reduces L_2 exactly as much as g_v does: ⟨d, g_2⟩ = ⟨g_v, g_2⟩ (EPO's balance).
    alpha, mode = alpha_of(G2, [1.0, 0.2], 1.0)
    assert mode == "balance"
    assert_close(alpha, torch.tensor([31 / 35, 4 / 35], dtype=F64), atol=1e-7, rtol=0)
    G = torch.tensor(G2, dtype=F64)
    assert_close((alpha @ G) @ G[1], torch.tensor(-0.3, dtype=F64), atol=1e-7, rtol=0)


def test_the_switch_is_the_held_out_loss_against_eps():
    # official: balance iff loss_val > eps (1e-3). With the TCM surrogate, loss_val = −TCM ≤
    # C·1e-6 < eps, so the official script always takes the dominance branch.
    assert alpha_of(G2, [1.0, 0.2], 1e-3)[1] == "dominance"
    assert alpha_of(G2, [1.0, 0.2], 1.1e-3)[1] == "balance"
    assert alpha_of(G2, [1.0, 0.2], 0.5, eps=0.6)[1] == "dominance"


def test_an_infeasible_program_falls_back_to_the_preference():
    # g_1 = [1, 0], g_2 = [−1, 0.1], g_v = [0, −1]: a = [0, −0.1], max a = 0, so αᵀa ≥ 0
    # forces α_2 = 0; then (Cα)_2 = ⟨g_2, g_1⟩ = −1 < 0: no α is feasible → π.
    alpha, mode = alpha_of(
        [[1.0, 0.0], [-1.0, 0.1]], [0.0, -1.0], -1.0, preference=torch.tensor([2.0, 1.0], dtype=F64)
    )
    assert mode == "fallback"
    assert torch.equal(alpha, torch.tensor([2.0, 1.0], dtype=F64))


def test_ties_go_to_the_preference_and_scale_changes_nothing():
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    v = torch.tensor([1.0, 1.0], dtype=F64)
    alpha, _ = pareto_alpha(G @ G.T, G @ v, -1.0, preference=torch.tensor([3.0, 1.0], dtype=F64))
    assert_close(alpha, torch.tensor([0.75, 0.25], dtype=F64), atol=1e-6, rtol=0)
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    gv = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=F64)
    for loss in (-1.0, 1.0):
        base, _ = pareto_alpha(g @ g.T, g @ gv, loss)
        for s in (1e-8, 1e6):
            assert_close(
                pareto_alpha(s * (g @ g.T), s * (g @ gv), loss)[0], base, atol=1e-6, rtol=0
            )


def test_bad_inputs_raise_naming_the_plugin():
    c = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="pareto-da: the per-objective gradients hold NaN"):
        pareto_alpha(c * math.nan, torch.zeros(2, dtype=F64), -1.0)
    with pytest.raises(ValueError, match="pareto-da: need gram"):
        pareto_alpha(c, torch.zeros(3, dtype=F64), -1.0)
    with pytest.raises(ValueError, match="pareto-da: preference"):
        pareto_alpha(
            c, torch.zeros(2, dtype=F64), -1.0, preference=torch.tensor([0.0, 0.0], dtype=F64)
        )


# -- agreement with the official construction, 3 objectives -----------------------------------------
def official_program(G: np.ndarray, G_val: np.ndarray, loss_val: float, eps: float = 1e-3):
    """The official get_alpha's program, restated: (objective vector, [(row, rhs)] meaning
    row·α ≥ rhs), over α ∈ Δ_m."""
    C = G @ G.T
    Ca = G @ G_val
    rl = np.mean(G * G_val, axis=1)
    if loss_val > eps:
        J = Ca > 0
        if len(np.where(J)[0]) > 0:
            J_star_idx = np.where(rl == np.max(rl))[0]
            rhs = Ca.copy()
            rhs[J] = -np.inf
            rhs[J_star_idx] = 0
        else:
            rhs = np.zeros_like(Ca)
        return Ca, [(C[j], rhs[j]) for j in range(len(Ca))]
    # dominance, restricted: αᵀCa ≥ −neg(max Ca), Cα ≥ 0; maximize sum(α @ C)
    neg = max(-np.max(Ca), 0.0)
    return C.sum(axis=0), [(Ca, -neg)] + [(C[j], 0.0) for j in range(len(Ca))]


def simplex_grid(n: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    a1, a2 = i[keep] / n, j[keep] / n
    return np.stack([a1, a2, 1 - a1 - a2], axis=1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("loss_val", [0.5, -0.2])
def test_agrees_with_the_official_program_solved_on_a_simplex_grid(seed, loss_val):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=20)
    G = np.stack([base, -0.5 * base + rng.normal(size=20), rng.normal(size=20)])  # conflicting
    G_val = 0.5 * base + rng.normal(size=20)
    objective, constraints = official_program(G, G_val, loss_val)
    alpha, mode = alpha_of(G, G_val, loss_val)
    a = alpha.numpy()
    assert mode == ("balance" if loss_val > 1e-3 else "dominance")
    scale = np.abs(G @ G.T).max()
    for row, rhs in constraints:  # feasible for the official constraints
        assert row @ a >= rhs - 1e-6 * scale
    grid = simplex_grid(400)
    feasible = np.ones(len(grid), dtype=bool)
    for row, rhs in constraints:
        feasible &= grid @ row >= rhs - 1e-12
    assert feasible.any()
    best = (grid[feasible] @ objective).max()
    # no grid point is better, and the grid's best is within one grid step of the LP optimum
    assert objective @ a >= best - 1e-6 * scale
    assert objective @ a <= best + 2 * np.abs(objective).max() / 400 + 1e-6 * scale


@pytest.mark.parametrize("seed", range(1, 6))  # feasible draws (seeds 0 and 10 are not)
def test_dominance_directions_descend_on_every_objective(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(30, generator=g, dtype=F64)
    G = torch.stack(
        [
            base,
            -0.6 * base + torch.randn(30, generator=g, dtype=F64),
            torch.randn(30, generator=g, dtype=F64),
        ]
    )
    g_val = torch.randn(30, generator=g, dtype=F64)
    alpha, mode = pareto_alpha(G @ G.T, G @ g_val, -1.0)
    assert mode == "dominance"
    d = alpha @ G
    assert bool((G @ d >= -1e-7 * (G @ G.T).abs().max()).all())  # ⟨g_j, d⟩ ≥ 0 for all j
