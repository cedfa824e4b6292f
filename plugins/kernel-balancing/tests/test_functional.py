"""The kernel-balancing math: hand-derived values, the official code's formula, the fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from paperhooks_kernel_balancing import (
    all_pairs,
    balance_penalty,
    balancing_objective,
    effective_sample_size,
    entropy_term,
    exponential_kernel,
    fit_balancing_weights,
    fit_embeddings,
    gaussian_kernel,
    imbalance,
    kernel_means,
    pair_features,
)

LN2 = math.log(2.0)


def col(*xs: float) -> torch.Tensor:
    """1-d covariates as a [N, 1] float64 column."""
    return torch.tensor(xs, dtype=torch.float64).unsqueeze(1)


# -- kernels, by hand -------------------------------------------------------------------------
def test_gaussian_and_exponential_kernels_match_hand_values():
    a = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # ‖a − b‖² = 0, 1, 2 → exp(−0.1·[0, 1, 2]) = [1, 0.9048374, 0.8187308]
    assert_close(
        gaussian_kernel(a, b, 0.1),
        torch.tensor([[1.0, 0.9048374, 0.8187308]], dtype=torch.float64),
        atol=1e-7,
        rtol=0,
    )
    # ‖a − b‖ = 0, 1, √2 → exp(−0.1·[0, 1, 1.4142136]) = [1, 0.9048374, 0.8681234]
    assert_close(
        exponential_kernel(a, b, 0.1),
        torch.tensor([[1.0, 0.9048374, 0.8681234]], dtype=torch.float64),
        atol=1e-7,
        rtol=0,
    )


def test_kernel_means_entropy_and_penalty_of_two_observed_and_four_total_points():
    # σ = ln 2 makes k(0, x) = 2^(−x²): 1, 1/2, 1/16, 1/512 at x = 0, 1, 2, 3.
    center, x_all, x_obs = col(0.0), col(0.0, 1.0, 2.0, 3.0), col(0.0, 1.0)
    w = torch.tensor([0.5, 1.5], dtype=torch.float64)
    # h_all = (1 + 0.5 + 0.0625 + 0.001953125)/4 = 1.564453125/4 = 0.39111328125
    h_all = kernel_means(center, x_all, None, "gaussian", LN2)
    assert_close(h_all, torch.tensor([0.39111328125], dtype=torch.float64))
    # h_obs = (0.5·1 + 1.5·0.5)/2 = 1.25/2 = 0.625
    h_obs = kernel_means(center, x_obs, w, "gaussian", LN2)
    assert_close(h_obs, torch.tensor([0.625], dtype=torch.float64))
    # penalty = |0.625 − 0.39111328125| − C = 0.23388671875 − 0.01 = 0.22388671875
    assert_close(
        balance_penalty(h_obs, h_all, 0.01), torch.tensor(0.22388671875, dtype=torch.float64)
    )
    # entropy = (0.5 ln 0.5 + 1.5 ln 1.5)/2 = (−0.3465736 + 0.6081977)/2 = 0.1308120
    assert_close(entropy_term(w), torch.tensor(0.1308120, dtype=torch.float64), atol=1e-7, rtol=0)
    # objective with γ = 2: 0.1308120 + 2·0.2238867 = 0.5785855
    k_obs = gaussian_kernel(center, x_obs, LN2)  # [1, 2] = [[1, 0.5]]
    objective = balancing_objective(w, k_obs, h_all, gamma=2.0, tolerance=0.01)
    assert_close(objective, torch.tensor(0.5785855, dtype=torch.float64), atol=1e-7, rtol=0)


def test_penalty_is_zero_for_exactly_balancing_weights():
    # x_obs = [0, 2], x_all = [0, 1, 1, 2], k(0, ·) = [1, 1/16] and [1, 1/2, 1/2, 1/16]:
    # h_all = 2.0625/4 = 0.515625; with w₁ + w₂ = 2, h_obs = (w₁ + (2 − w₁)/16)/2 = 0.515625
    # gives 0.9375 w₁ = 0.90625, w₁ = 29/30, w₂ = 31/30.
    center, x_all, x_obs = col(0.0), col(0.0, 1.0, 1.0, 2.0), col(0.0, 2.0)
    w = torch.tensor([29 / 30, 31 / 30], dtype=torch.float64)
    h_all = kernel_means(center, x_all, None, "gaussian", LN2)
    h_obs = kernel_means(center, x_obs, w, "gaussian", LN2)
    assert_close(h_obs, h_all)
    assert balance_penalty(h_obs, h_all, 1e-12).item() == 0.0
    assert_close(
        imbalance(w, x_obs, x_all, center, "gaussian", LN2), torch.zeros(1, dtype=torch.float64)
    )
    # uniform weights are not balanced: h_obs = (1 + 1/16)/2 = 0.53125, 0.015625 above h_all
    assert_close(
        imbalance(torch.ones(2, dtype=torch.float64), x_obs, x_all, center, "gaussian", LN2),
        torch.tensor([0.015625], dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("h_obs", "each", "summed"),
    [
        # Δ = [0.1, −0.1], C = 0.01: each 0.09 + 0.09 = 0.18; the summed imbalance cancels to 0
        ([0.6, 0.4], 0.18, 0.0),
        # Δ = [0.1, 0.05]: each 0.09 + 0.04 = 0.13; summed max(0, 0.15 − 0.01) = 0.14
        ([0.6, 0.55], 0.13, 0.14),
        # Δ = [0.005, −0.002]: within C everywhere → 0 for both
        ([0.505, 0.498], 0.0, 0.0),
    ],
)
def test_each_and_sum_hinges_match_hand_values(h_obs, each, summed):
    h_obs, h_all = (
        torch.tensor(h_obs, dtype=torch.float64),
        torch.full((2,), 0.5, dtype=torch.float64),
    )
    assert_close(
        balance_penalty(h_obs, h_all, 0.01, "each"), torch.tensor(each, dtype=torch.float64)
    )
    assert_close(
        balance_penalty(h_obs, h_all, 0.01, "sum"), torch.tensor(summed, dtype=torch.float64)
    )


def test_unknown_hinge_raises_naming_the_plugin():
    with pytest.raises(ValueError, match="kernel-balancing.*hinge"):
        balance_penalty(torch.zeros(1), torch.zeros(1), 0.0, "max")


def test_entropy_of_uniform_weights_is_zero_and_zero_weights_count_zero():
    assert entropy_term(torch.ones(5)).item() == 0.0
    # 0·log 0 = 0: w = [0, 2] gives (0 + 2 ln 2)/2 = ln 2
    assert_close(entropy_term(torch.tensor([0.0, 2.0])), torch.tensor(LN2))


def test_effective_sample_size_matches_hand_values():
    assert_close(effective_sample_size(torch.ones(4)), torch.tensor(4.0))
    # (1 + 3)² / (1 + 9) = 16/10
    assert_close(effective_sample_size(torch.tensor([1.0, 3.0])), torch.tensor(1.6))


# -- agreement with the official code ------------------------------------------------------------
def _official_weight_loss(w, f_j, f_o, f_d, gamma, C, kernel):
    """The official ``MF_KBIPS_Gau.fit`` / ``MF_KBIPS_Exp.fit`` weight-model loss, restated.

    ``gau_kernel(X, Y)`` there is exp(−0.1(|Y|² + |X|²ᵀ − 2 Y Xᵀ)), shape [len(Y), len(X)];
    ``exp_kernel(X, Y)`` is exp(−0.1 |cdist(Y, X)|); h_all = mean(k(f_j, f_d), axis=0);
    h_obs = 1/n · wᵀ k(f_j, f_o); loss_ker_bal = max(0, Σ(h_all − h_obs) − C) + max(0, Σ(h_obs −
    h_all) − C); loss = 1/n · w·log w + γ · loss_ker_bal.
    """

    def k(X, Y):
        if kernel == "gaussian":
            sq = (Y**2).sum(1, keepdim=True) + (X**2).sum(1, keepdim=True).T - 2 * Y @ X.T
            return torch.exp(-sq * 0.1)
        return torch.exp(-torch.cdist(Y, X).abs() * 0.1)

    h_all = k(f_j, f_d).mean(0)
    h_obs = 1 / len(w) * (w.unsqueeze(1).T @ k(f_j, f_o)).squeeze()
    zero = torch.zeros(1, dtype=w.dtype)
    bal = (
        torch.max(zero, (h_all - h_obs).sum() - C).sum()
        + torch.max(zero, (h_obs - h_all).sum() - C).sum()
    )
    return 1 / len(w) * torch.dot(w, torch.log(w)) + gamma * bal


@pytest.mark.parametrize("kernel", ["gaussian", "exponential"])
@pytest.mark.parametrize("C", [1e-5, 1e-2])
def test_objective_with_sum_hinge_equals_the_official_weight_loss(kernel, C):
    g = torch.Generator().manual_seed(3)
    f_o = torch.randn(7, 4, generator=g, dtype=torch.float64) + 0.8  # observed pairs, shifted
    f_d = torch.randn(20, 4, generator=g, dtype=torch.float64)  # sampled pairs
    f_j = f_d[:3]  # J = 3 centers from the sample, as the code draws them
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.2
    ours = balancing_objective(
        w,
        exponential_kernel(f_j, f_o, 0.1)
        if kernel == "exponential"
        else gaussian_kernel(f_j, f_o, 0.1),
        kernel_means(f_j, f_d, None, kernel, 0.1),
        gamma=1.0,
        tolerance=C,
        hinge="sum",
    )
    official = _official_weight_loss(w, f_j, f_o, f_d, gamma=1.0, C=C, kernel=kernel)
    assert (
        official.item() > _official_weight_loss(w, f_j, f_o, f_d, 0.0, C, kernel).item()
    )  # the hinge is active
    assert_close(ours, official, atol=1e-12, rtol=1e-10)


# -- the fit ------------------------------------------------------------------------------------
def _biased_line(seed: int = 0):
    """201 points on [−2, 2], each observed with probability σ(2x): high x over-represented."""
    x_all = torch.linspace(-2, 2, 201, dtype=torch.float64).unsqueeze(1)
    p = torch.sigmoid(2 * x_all[:, 0])
    observed = (
        torch.rand(201, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < p
    )
    return x_all, x_all[observed], p[observed]


def _fit(x_obs, x_all, seed=1, **kw):
    args = dict(gamma=10.0, tolerance=1e-4, num_centers=16, steps=300, lr=0.05, bandwidth=0.1)
    args.update(kw)
    return fit_balancing_weights(
        x_obs, x_all, generator=torch.Generator().manual_seed(seed), **args
    )


def test_fit_balances_a_biased_sample_and_recovers_inverse_propensities():
    x_all, x_obs, p = _biased_line()
    w = _fit(x_obs, x_all)
    assert w.shape == (x_obs.shape[0],) and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert_close(w.mean(), torch.tensor(1.0, dtype=torch.float64))
    centers = x_all[::4]  # 51 kernel functions, not only the ones the fit drew
    before = imbalance(torch.ones_like(w), x_obs, x_all, centers).abs().mean()
    after = imbalance(w, x_obs, x_all, centers).abs().mean()
    # measured: 0.1105 → 0.0011; the weights' correlation with 1/p is 0.93
    assert after < before / 20, (before, after)
    assert torch.corrcoef(torch.stack([w, 1 / p]))[0, 1] > 0.8


def test_fit_is_deterministic_in_the_generator_seed():
    x_all, x_obs, _ = _biased_line()
    assert torch.equal(_fit(x_obs, x_all, seed=4), _fit(x_obs, x_all, seed=4))
    assert not torch.equal(_fit(x_obs, x_all, seed=4), _fit(x_obs, x_all, seed=5))


def test_gamma_zero_gives_exactly_uniform_weights():
    x_all, x_obs, _ = _biased_line()
    assert torch.equal(
        _fit(x_obs, x_all, gamma=0.0), torch.ones(x_obs.shape[0], dtype=torch.float64)
    )


def test_a_small_center_pool_still_balances():
    x_all, x_obs, _ = _biased_line()
    w = _fit(x_obs, x_all, center_pool=20)  # 20 of the 201 pairs can be centers
    centers = x_all[::4]
    assert (
        imbalance(w, x_obs, x_all, centers).abs().mean()
        < imbalance(torch.ones_like(w), x_obs, x_all, centers).abs().mean() / 10
    )


def test_an_unbiased_sample_keeps_nearly_uniform_weights():
    x_all = torch.linspace(-2, 2, 201, dtype=torch.float64).unsqueeze(1)
    w = _fit(x_all[::2], x_all)  # every other point: already balanced up to the grid
    assert effective_sample_size(w) / w.numel() > 0.95


# -- covariates ---------------------------------------------------------------------------------
def test_all_pairs_and_pair_features_by_hand():
    assert all_pairs(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    users = torch.tensor([[1.0], [2.0]])
    items = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    assert pair_features(users, items, torch.tensor([[1, 2], [0, 0]])).tolist() == [
        [2.0, 30.0, 31.0],
        [1.0, 10.0, 11.0],
    ]


def test_fitted_embeddings_are_standardized_and_carry_the_user_effect():
    # ratings = user effect a_u + item effect c_i, every pair observed
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(12, generator=g), torch.randn(9, generator=g)
    pairs = all_pairs(12, 9)
    ratings = a[pairs[:, 0]] + c[pairs[:, 1]]
    users, items = fit_embeddings(
        pairs, ratings, 12, 9, dim=2, steps=300, generator=torch.Generator().manual_seed(1)
    )
    assert users.shape == (12, 3) and items.shape == (9, 3)
    assert_close(users.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    assert_close(users.std(0, unbiased=False), torch.ones(3, dtype=torch.float64))
    # the bias column (last) follows the user effect (measured correlation 0.987; the
    # embedding columns take up the rest)
    assert torch.corrcoef(torch.stack([users[:, -1], a.double()]))[0, 1] > 0.95
    again = fit_embeddings(
        pairs, ratings, 12, 9, dim=2, steps=300, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(users, again[0]) and torch.equal(items, again[1])
