"""Tests of the PGD functional form, with values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from paperhooks_pgd import class_means, linf_pgd, project, uniform_start

# A linear loss L(x) = Σ_j a_j x_j: its input gradient is a, whatever x, so every step moves
# by α·sign(a) and the result can be followed by hand.
A = torch.tensor([[1.0, -2.0, 0.5, 0.0]])


def linear_loss(x: torch.Tensor) -> torch.Tensor:
    return (x * A).sum(dim=1)  # [B]


def test_three_steps_on_a_linear_loss_by_hand():
    # x = [0.5, 0.5, 0.95, 0.2], ε = 0.1, α = 0.04, sign(a) = [1, −1, 1, 0], bounds [0, 1]:
    # t=1: [0.54, 0.46, 0.99, 0.2]      (inside the ball [x−ε, x+ε] and [0, 1])
    # t=2: [0.58, 0.42, 1.03→1.0, 0.2]  (1.03 is inside the ball (≤ 1.05) but clipped to 1)
    # t=3: [0.62→0.6, 0.38→0.4, 1.04→1.0, 0.2]   (ball clip at x ± ε, then range clip)
    # The last coordinate has a zero gradient: sign(0) = 0 leaves it where it is.
    x = torch.tensor([[0.5, 0.5, 0.95, 0.2]])
    out = linf_pgd(linear_loss, x, epsilon=0.1, step_size=0.04, steps=3)
    assert_close(out, torch.tensor([[0.6, 0.4, 1.0, 0.2]]))
    # one step and two steps, as in the comment
    assert_close(linf_pgd(linear_loss, x, 0.1, 0.04, 1), torch.tensor([[0.54, 0.46, 0.99, 0.2]]))
    assert_close(linf_pgd(linear_loss, x, 0.1, 0.04, 2), torch.tensor([[0.58, 0.42, 1.0, 0.2]]))


def test_enough_steps_reach_the_corner_that_maximizes_a_linear_loss():
    # max over the ℓ∞ ball of aᵀ(x + δ) is at δ = ε·sign(a) (the FGSM point): PGD with
    # K·α ≥ ε reaches it exactly, and no bounds means no range clip.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g)
    out = linf_pgd(linear_loss, x, epsilon=0.3, step_size=0.1, steps=4, bounds=None)
    assert_close(out, x + 0.3 * A.sign())


def test_random_start_is_not_clipped_to_the_range_before_the_first_gradient():
    # The official perturb() adds U(−ε, ε) and takes the first gradient there, unclipped.
    # L(x) = −(x − 1.01)²: ∇ = −2(x − 1.01), so the sign says on which side of 1.01 x is.
    # x = 0.98, δ⁰ = +0.05 → x⁰ = 1.03 (outside [0, 1]); ∇ < 0 → 1.03 − 0.05 = 0.98
    # (inside the ball [0.88, 1.08] and [0, 1]). Had x⁰ been clipped to 1.0 first, ∇ > 0 and
    # the step would give 1.05 → 1.0.
    x = torch.tensor([[0.98]])

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return -((xa - 1.01) ** 2).sum(dim=1)

    out = linf_pgd(loss, x, epsilon=0.1, step_size=0.05, steps=1, delta0=torch.tensor([[0.05]]))
    assert_close(out, torch.tensor([[0.98]]))


@pytest.mark.parametrize("seed", range(4))
def test_result_stays_in_the_ball_and_the_range_and_raises_the_loss(seed):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.rand(32, 6, generator=g)
    y = torch.randint(3, (32,), generator=g)

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(xa), y, reduction="none")

    eps = 0.2
    out = linf_pgd(loss, x, eps, 0.05, 10, delta0=uniform_start(x.shape, eps, g))
    assert (out - x).abs().max() <= eps + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert out.dtype == x.dtype and not out.requires_grad
    # PGD raises the mean loss above the clean loss and above random noise of the same size
    noise = project(x + uniform_start(x.shape, eps, g), x, eps, (0.0, 1.0))
    with torch.no_grad():
        assert loss(out).mean() > loss(noise).mean() > 0
        assert loss(out).mean() > loss(x).mean()
    assert all(p.grad is None for p in model.parameters())  # only the input got a gradient


def test_runs_under_no_grad_as_in_evaluation():
    x = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    with torch.no_grad():
        out = linf_pgd(linear_loss, x, 0.1, 0.1, 1)
    assert_close(out, torch.tensor([[0.6, 0.4, 0.6, 0.5]]))


def test_uniform_start_is_in_the_ball_and_reproducible():
    a = uniform_start((1000,), 0.25, torch.Generator().manual_seed(3))
    b = uniform_start((1000,), 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.abs().max() <= 0.25
    # U(−ε, ε) has mean 0 and standard deviation ε/√3 = 0.1443
    assert abs(a.mean().item()) < 0.02
    assert abs(a.std().item() - 0.25 / math.sqrt(3)) < 0.01


def test_zero_steps_are_refused():
    with pytest.raises(ValueError, match="pgd: steps"):
        linf_pgd(linear_loss, torch.zeros(1, 4), 0.1, 0.1, 0)


def test_class_means_by_hand():
    # classes [0, 0, 1, 2, 2, 2], values [1, 0, 1, 1, 1, 0] → class 0: 1/2, 1: 1, 2: 2/3, 3: absent
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    acc = class_means(values, target, 4)
    assert_close(acc[:3], torch.tensor([0.5, 1.0, 2 / 3], dtype=torch.float64))
    assert math.isnan(acc[3].item())
