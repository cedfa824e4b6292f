"""ParetoDA's dynamic-preference linear program (EPO-style), from inner products alone.

Lv et al., "Pareto Domain Adaptation" (NeurIPS 2021), §3.3; the LP is the one of the official
``tools/EPO_LP.get_alpha`` (``BIT-DA/ParetoDA`` at ``6691766``, ``tools/epo_lp_dna.py``,
adapted from EPO search, Mahapatra & Rajan 2020), solved here with ``scipy.optimize.linprog``
(HiGHS dual simplex) instead of cvxpy + GLPK.

For the m training objectives' gradients g_j (rows of G) and the held-out gradient g_v:
``C = G Gᵀ`` ``[m, m]``, ``a = G g_v`` ``[m]``, and α on the simplex Δ_m::

    balance    (L_v > ε):  max_α  αᵀa   s.t.  (Cα)_j ≥ a_j  for j with a_j ≤ 0,
                                              (Cα)_j* ≥ 0  for j* = argmax_j a_j (when some a_j > 0)
                                              (all (Cα)_j ≥ 0 when no a_j > 0)
    dominance  (L_v ≤ ε):  max_α  1ᵀCα  s.t.  αᵀa ≥ min(max_j a_j, 0),  Cα ≥ 0

``1ᵀCα = ⟨Σ_j g_j, Gᵀα⟩`` is the descent of the summed objective along d = Gᵀα, ``(Cα)_j =
⟨g_j, d⟩`` the descent of objective j, ``αᵀa = ⟨g_v, d⟩`` that of the held-out loss. An
infeasible program falls back to the preference π (official: ``alpha = preference``).

Only ``C``, ``a`` and ``L_v`` are read: global values identical on every rank, so every rank
solves the same program to the same α, with no gradient vector kept.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linprog

from paperhooks_pareto_da.functional import PLUGIN

Mode = Literal["balance", "dominance", "fallback"]

#: weight of the distance to π in the tie-breaking objective (scaled program, see below)
TIE_WEIGHT = 1e-6


def _solve(
    c: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray, target: np.ndarray
) -> np.ndarray | None:
    """``argmin cᵀα + δ ‖α − target‖₁`` s.t. ``A_ub α ≤ b_ub``, α ∈ Δ_m; None when infeasible.

    An LP's optimum is often a face, not a point (orthogonal unit gradients make the dominance
    objective constant on Δ); GLPK's simplex then returns an arbitrary vertex. The term
    ``δ ‖α − target‖₁`` (δ = 1e-6 on the scaled program) picks, among the optimal α, the one
    nearest ``target``, and leaves a unique optimum alone unless another vertex is within
    2δ of it. Variables ``[α, t]`` with ``|α − target| ≤ t``.
    """
    m = c.size
    eye = np.eye(m)
    rows = [np.hstack([eye, -eye]), np.hstack([-eye, -eye])]  # α − t ≤ target, −α − t ≤ −target
    rhs = [target, -target]
    if a_ub.size:
        rows.append(np.hstack([a_ub, np.zeros((a_ub.shape[0], m))]))
        rhs.append(b_ub)
    res = linprog(
        np.concatenate([c, np.full(m, TIE_WEIGHT)]),
        A_ub=np.vstack(rows),
        b_ub=np.concatenate(rhs),
        A_eq=np.hstack([np.ones((1, m)), np.zeros((1, m))]),
        b_eq=np.ones(1),
        bounds=[(0.0, None)] * (2 * m),
        method="highs-ds",
    )
    return res.x[:m] if res.status == 0 and res.x is not None else None


def pareto_alpha(
    gram: torch.Tensor,
    heldout_dot: torch.Tensor,
    heldout_loss: float,
    *,
    eps: float = 1e-3,
    preference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Mode]:
    """α of ParetoDA's LP (see the module docstring), and which branch produced it.

    :param gram: C = G Gᵀ, ``[m, m]``.
    :param heldout_dot: a = G g_v, ``[m]``.
    :param heldout_loss: L_v, the held-out objective's value (official ``loss_val``).
    :param eps: ε of the switch between balance and dominance (official 1e-3).
    :param preference: π ``[m]`` (official ``--pref1..3``, all 1): the fallback when the
        program is infeasible, and the point ties among optimal α are broken towards
        (π / Σπ, nearest in L1; see :func:`_solve`).
    :return: α ``[m]`` float64 (on Δ_m, or π on fallback) and ``"balance"``, ``"dominance"``
        or ``"fallback"``.
    """
    C = gram.detach().to(torch.float64).cpu().numpy()
    a = heldout_dot.detach().to(torch.float64).cpu().numpy().reshape(-1)
    m = C.shape[0]
    if C.shape != (m, m) or a.shape != (m,):
        raise ValueError(
            f"{PLUGIN}: need gram [m, m] and heldout_dot [m], got {C.shape} and {a.shape}"
        )
    if not (np.isfinite(C).all() and np.isfinite(a).all()):
        raise ValueError(f"{PLUGIN}: the per-objective gradients hold NaN or inf")
    pref = np.ones(m) if preference is None else preference.detach().to(torch.float64).cpu().numpy()
    if pref.shape != (m,) or not (np.isfinite(pref).all() and (pref >= 0).all() and pref.sum() > 0):
        raise ValueError(
            f"{PLUGIN}: preference must be {m} finite values >= 0, not all 0; got {pref.tolist()}"
        )
    # a positive scale changes no solution (every constraint is homogeneous in (C, a))
    # and keeps HiGHS' absolute tolerances meaningful whatever the gradients' magnitude
    scale = max(np.abs(C).max(initial=0.0), np.abs(a).max(initial=0.0))
    if scale > 0:
        C, a = C / scale, a / scale

    if heldout_loss > eps:
        mode: Mode = "balance"
        c = -a
        positive = a > 0
        if positive.any():
            rhs = a.copy()
            rhs[positive] = -np.inf  # aligned with g_v: unconstrained...
            rhs[a == a.max()] = 0.0  # ...except the most aligned, which must not ascend
        else:
            rhs = np.zeros(m)
        keep = np.isfinite(rhs)
        a_ub, b_ub = -C[keep], -rhs[keep]
    else:
        mode = "dominance"
        c = -C.sum(axis=0)  # −1ᵀC
        a_ub = np.vstack([-a[None, :], -C])
        b_ub = np.concatenate([[-min(a.max(), 0.0)], np.zeros(m)])

    alpha = _solve(c, a_ub, b_ub, pref / pref.sum())
    if alpha is None:
        return torch.as_tensor(pref, dtype=torch.float64), "fallback"
    alpha = np.clip(alpha, 0.0, None)
    return torch.as_tensor(alpha / alpha.sum(), dtype=torch.float64), mode


__all__ = ["TIE_WEIGHT", "Mode", "pareto_alpha"]
