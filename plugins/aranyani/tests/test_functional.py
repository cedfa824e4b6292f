"""The pure functions and the forest, on values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from paperhooks_aranyani import (
    ObliqueForest,
    accumulate,
    correction,
    demographic_parity,
    fairness_gradient,
    group_gap,
    huber_derivative,
    routing_matrix,
)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# -- H'(F) and the fairness gradient -------------------------------------------------------------
def test_huber_derivative_is_F_inside_delta_and_the_sign_outside():
    F = torch.tensor([-0.5, -0.01, -0.004, 0.0, 0.003, 0.0099, 0.01, 0.2], dtype=torch.float64)
    # |F| < 0.01: F itself; |F| >= 0.01: sign(F - 0.005) = sign(F)
    expected = torch.tensor([-1.0, -1.0, -0.004, 0.0, 0.003, 0.0099, 1.0, 1.0], dtype=torch.float64)
    assert torch.equal(huber_derivative(F, 0.01), expected)


def test_fairness_gradient_broadcasts_F_over_the_node_axis():
    # T = 1 tree, N = 2 nodes, D = 2 features. F = [0.5, 0.004] with δ = 0.01 → H' = [1, 0.004].
    F = torch.tensor([[0.5, 0.004]])
    e1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [T, D, N]
    e0 = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    # λ = 0.3: node 0 column (1 − 0, 3 − 1)·1·0.3 = (0.3, 0.6); node 1 column (1, 3)·0.004·0.3
    expected = torch.tensor([[[0.3, 0.0012], [0.6, 0.0036]]])
    assert_close(fairness_gradient(F, e1, e0, 0.3, 0.01), expected)
    # B: [T, N]
    assert_close(
        fairness_gradient(F, torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.0]]), 0.3, 0.01),
        torch.tensor([[0.15, 0.0012]]),
    )
    with pytest.raises(ValueError, match="aranyani"):
        fairness_gradient(F, e1, e0[..., :1], 0.3, 0.01)


def test_group_gap_is_the_difference_of_group_means():
    sums = torch.tensor([[[1.0, 2.0]], [[3.0, 3.0]]], dtype=torch.float64)  # [2, T=1, N=2]
    counts = torch.tensor([4.0, 2.0], dtype=torch.float64)
    # S_1/N_1 − S_0/N_0 = [3/2 − 1/4, 3/2 − 2/4] = [1.25, 1.0]
    assert_close(group_gap(sums, counts), torch.tensor([[1.25, 1.0]], dtype=torch.float64))


# -- running averages -----------------------------------------------------------------------------
def test_vanilla_batches_give_the_running_mean_of_all_samples():
    g = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # per sample, the official rule g_t = g_{t−1}(1 − 1/t) + x_t/t
    seq = torch.zeros(3, dtype=torch.float64)
    for t in range(7):
        seq = seq * (1 - 1 / (t + 1)) + g[t] / (t + 1)
    assert_close(seq, g.mean(0))
    # the same 7 samples in batches of 3, 1, 3
    avg, count = torch.zeros(3, dtype=torch.float64), 0
    for lo, hi in ((0, 3), (3, 4), (4, 7)):
        avg = accumulate(avg, count, g[lo:hi].mean(0), hi - lo, "vanilla", 0.9)
        count += hi - lo
    assert_close(avg, g.mean(0))
    assert torch.equal(accumulate(avg, count, g[0], 0, "vanilla", 0.9), avg)  # no sample: unchanged


def test_ema_with_bias_correction_by_hand():
    # γ = 0.9, samples 1, 2, 3 one at a time: m = 1 → 0.9 + 2 = 2.9 → 2.61 + 3 = 5.61;
    # correction (1 − 0.9)/(1 − 0.9³) = 0.1/0.271; E = 5.61·0.1/0.271 = 2.0701107
    m = torch.zeros(1, dtype=torch.float64)
    for t, x in enumerate((1.0, 2.0, 3.0)):
        m = accumulate(m, t, torch.tensor([x], dtype=torch.float64), 1, "ema", 0.9)
    assert_close(m, torch.tensor([5.61], dtype=torch.float64))
    assert correction(3, "ema", 0.9) * m.item() == pytest.approx(2.0701107, abs=1e-7)
    assert correction(3, "momentum", 0.9) == 1.0 and correction(3, "vanilla", 0.9) == 1.0
    # a batch of n folds in with the batch's average decay: γⁿ m + (1 − γⁿ)/(1 − γ) · mean;
    # n = 2, mean 1 from m = 0: (1 − 0.81)/0.1 = 1.9 = the weights of the two samples 0.9 + 1
    two = accumulate(
        torch.zeros(1, dtype=torch.float64), 0, torch.ones(1, dtype=torch.float64), 2, "ema", 0.9
    )
    assert_close(two, torch.tensor([1.9], dtype=torch.float64))
    # with the correction this is the mean again: 1.9 · 0.1/(1 − 0.81) = 1
    assert correction(2, "ema", 0.9) * two.item() == pytest.approx(1.0)


def test_demographic_parity_by_hand():
    pred = torch.tensor([1, 0, 1, 1, 0, 0])
    group = torch.tensor([1, 1, 1, 0, 0, 0])
    # P(ŷ=1 | a=1) = 2/3, P(ŷ=1 | a=0) = 1/3
    assert demographic_parity(pred, group).item() == pytest.approx(1 / 3)


# -- the forest -----------------------------------------------------------------------------------
def test_routing_matrix_of_depth_2_by_hand():
    # heap: root 1 (left 2, right 3); node 2 → leaves 4, 5; node 3 → leaves 6, 7.
    # leaf 4: left of 1, left of 2; leaf 5: left of 1, right of 2; leaf 6: right of 1, left of 3 …
    expected = torch.tensor(
        [
            [1.0, 1.0, -1.0, -1.0],
            [1.0, -1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, -1.0],
        ]
    )
    assert torch.equal(routing_matrix(2), expected)
    assert torch.equal(routing_matrix(1), torch.tensor([[1.0, -1.0]]))


def test_forest_of_one_depth_1_tree_by_hand():
    # n = σ(2·0.5 − 1) = σ(0) = 0.5 for x = 0.5; leaves θ_left = [0, ln 3] → softmax [1/4, 3/4],
    # θ_right = [0, 0] → [1/2, 1/2]; p = 0.5·[1/4, 3/4] + 0.5·[1/2, 1/2] = [3/8, 5/8]
    forest = ObliqueForest(1, 2, depth=1, trees=1)
    with torch.no_grad():
        forest.W.fill_(2.0)
        forest.B.fill_(-1.0)
        forest.theta.copy_(torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]]))
    x = torch.tensor([[0.5]])
    assert_close(forest.node_decisions(x), torch.tensor([[[0.5]]]))
    assert_close(forest.probabilities(x), torch.tensor([[3 / 8, 5 / 8]]))
    assert_close(forest(x), torch.tensor([[math.log(3 / 8), math.log(5 / 8)]]))


def test_forest_probabilities_sum_to_one_and_trees_are_averaged():
    torch.manual_seed(0)
    forest = ObliqueForest(5, 3, depth=3, trees=3)
    assert (forest.W.shape, forest.B.shape, forest.theta.shape) == ((3, 5, 7), (3, 7), (3, 8, 3))
    x = torch.randn(4, 5)
    p = forest.probabilities(x)
    assert_close(p.sum(-1), torch.ones(4))
    n = forest.node_decisions(x)
    # node i of tree t: σ(w_tiᵀx + b_ti)
    assert n[2, 1, 4].item() == pytest.approx(
        sigmoid(float(x[1] @ forest.W.detach()[2, :, 4] + forest.B.detach()[2, 4])), rel=1e-6
    )
    leaf = forest.leaf_probabilities(n)
    assert_close(leaf.sum(-1), torch.ones(3, 4))
    # leaf 0 of depth 3 goes left at nodes 1, 2, 4 (indices 0, 1, 3): n_0 n_1 n_3
    assert_close(leaf[:, :, 0], n[:, :, 0] * n[:, :, 1] * n[:, :, 3])
    per_tree = torch.einsum("tbl,tlc->tbc", leaf, torch.softmax(forest.theta, -1))
    assert_close(p, per_tree.mean(0))
