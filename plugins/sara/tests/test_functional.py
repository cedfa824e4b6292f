"""SaRA's pieces on small tensors worked out by hand."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from paperhooks_sara import SparseUpdate, ineffective, lr_rule, nuclear_norm, quantile_threshold


def test_lr_rule_by_hand():
    # 1e-3 · exp(−350 · 2e-3) = 1e-3 · exp(−0.7) = 4.9659e-4;  ε = 0 gives 1e-3
    assert math.isclose(lr_rule(2e-3), 1e-3 * math.exp(-0.7))
    assert math.isclose(lr_rule(2e-3), 4.9659e-4, rel_tol=1e-4)
    assert lr_rule(0.0) == 1e-3


def test_ineffective_entries_are_strictly_below_the_threshold():
    w = torch.tensor([[0.001, -0.002], [0.0019, -0.5]])
    # |w| < 2e-3: 0.001 yes, 0.002 no (not strictly below), 0.0019 yes, 0.5 no
    assert ineffective(w, 2e-3).tolist() == [[True, False], [True, False]]


def test_quantile_threshold_selects_the_fraction_by_hand():
    # |entries| sorted: 0.1 0.2 0.3 0.4 | 0.5 0.6 0.7 0.8 0.9 1.0 (10 entries, two tensors)
    a = torch.tensor([0.5, -0.1, 0.9, 0.3])
    b = torch.tensor([[-0.2, 1.0, 0.7], [0.4, -0.6, 0.8]])
    eps = quantile_threshold([a, b], 0.4)  # k = 4: ε = the 5th smallest = 0.5
    assert eps == 0.5
    assert int(ineffective(a, eps).sum() + ineffective(b, eps).sum()) == 4
    assert quantile_threshold([a], 0.0) == float(
        torch.tensor(0.1)
    )  # k = 0: nothing lies strictly below the smallest


def test_nuclear_norm_of_a_diagonal_matrix_is_the_sum_of_absolute_diagonal_entries():
    # singular values of diag(3, −2, 0.5) are 3, 2, 0.5: ‖·‖_* = 5.5
    d = torch.diag(torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)).requires_grad_(True)
    value = nuclear_norm(d)
    assert_close(value, torch.tensor(5.5, dtype=torch.float64))
    # its gradient is U Vᵀ = diag(sign(d)) for distinct non-zero singular values
    value.backward()
    assert_close(d.grad, torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)))
    # a rank-1 matrix u vᵀ has a single singular value ‖u‖‖v‖ = 5 · 1
    u, v = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    assert_close(nuclear_norm(torch.outer(u, v)), torch.tensor(5.0))


def test_sparse_update_by_hand():
    # P₀ = [[0.001, 0.5], [−0.002, −0.0005]], ε = 2e-3: M = [[1, 0], [0, 1]]
    p0 = torch.tensor([[0.001, 0.5], [-0.002, -0.0005]])
    part = SparseUpdate(p0, 2e-3)
    assert part.mask.tolist() == [[True, False], [False, True]]
    # V = [[10, 20], [30, 40]]: P = M ⊙ V + (1 − M) ⊙ P₀ = [[10, 0.5], [−0.002, 40]]
    v = torch.tensor([[10.0, 20.0], [30.0, 40.0]], requires_grad=True)
    out = part(v)
    assert_close(out, torch.tensor([[10.0, 0.5], [-0.002, 40.0]]))
    # L = Σ C ⊙ P: ∂L/∂V = C ⊙ M = [[1, 0], [0, 4]]
    (out * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert_close(v.grad, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    assert_close(part.right_inverse(p0), p0)


def test_reselection_keeps_only_entries_still_below_the_threshold_and_freezes_the_rest():
    p0 = torch.tensor([0.001, 0.5, -0.0015, 0.0001])  # M = [1, 0, 1, 1]
    part = SparseUpdate(p0, 2e-3)
    # after training the trainable entries are 0.01 (grew), 0.0003, −0.0019
    current = torch.tensor([0.01, 0.5, 0.0003, -0.0019])
    part.reselect(current, 2e-3)
    # M ← M ⊙ 1[|P_T| < ε] = [0, 0, 1, 1]; P₀ ← P_T, so the grown entry stays at 0.01
    assert part.mask.tolist() == [False, False, True, True]
    assert_close(part(torch.full((4,), 7.0)), torch.tensor([0.01, 0.5, 7.0, 7.0]))
