"""The objectives' pieces: TCM, refinement, gradient reversal, the discriminators' losses.

Values are worked out by hand in the comments; the official TCM is restated from
``tools/TCM_loss.py`` (BIT-DA/ParetoDA @ 6691766) and compared on small inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from paperhooks_pareto_da import (
    Discriminators,
    class_domain_bce,
    domain_bce,
    grl_coefficient,
    log_refine,
    refine,
    reverse_gradient,
    tcm,
    tcm_terms,
)


def official_tcm(outputs_target: torch.Tensor) -> torch.Tensor:
    """``TCM`` of ``tools/TCM_loss.py``, restated: softmax of the given logits, then
    H(mean p + 1e-6 inside the log) − mean H(p) (no ε in the second entropy)."""
    b = outputs_target.shape[0]
    p = torch.softmax(outputs_target, dim=1)
    avg = p.sum(dim=0) / b
    item1 = -(avg * torch.log(avg + 1e-6)).sum()
    item2 = -(p * torch.log(p)).sum() / b
    return item1 - item2


# -- TCM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [2, 3, 10])
def test_tcm_of_uniform_predictions_is_zero(c):
    # p̄ = ρ_i = 1/C: H_ε(p̄) = log C − log(1 + C·1e-6) ≈ log C − C·1e-6, mean H(ρ_i) = log C
    rho = torch.full((8, c), 1.0 / c, dtype=torch.float64)
    assert tcm(rho).item() == pytest.approx(-math.log1p(c * 1e-6), abs=1e-12)
    assert abs(tcm(rho).item()) < 1e-5


@pytest.mark.parametrize("c", [2, 3, 10])
def test_tcm_of_confident_diverse_predictions_is_log_c(c):
    # one-hot rows, each class equally often: p̄ = 1/C, so TCM = log C − log(1 + C·1e-6) − 0
    rho = torch.eye(c, dtype=torch.float64).repeat(3, 1)
    assert tcm(rho).item() == pytest.approx(math.log(c) - math.log1p(c * 1e-6), abs=1e-12)
    assert tcm(rho).item() == pytest.approx(math.log(c), abs=1e-4)
    # confident but all one class: p̄ one-hot, TCM = H_ε(e_1) = −log(1 + 1e-6) ≈ 0
    assert abs(tcm(torch.eye(c, dtype=torch.float64)[[0, 0, 0]]).item()) < 1e-5


def test_tcm_equals_the_official_formula_on_logits():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    assert_close(tcm(torch.softmax(logits, dim=1)), official_tcm(logits), rtol=0, atol=1e-12)


def test_per_sample_terms_have_the_batch_tcm_as_mean_and_the_same_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rho = torch.softmax(logits, dim=1)
    terms = tcm_terms(rho, rho.mean(0))
    assert terms.shape == (12,)
    assert_close(terms.mean(), tcm(rho), rtol=0, atol=1e-12)
    (g_terms,) = torch.autograd.grad(terms.mean(), logits, retain_graph=True)
    (g_batch,) = torch.autograd.grad(tcm(rho), logits)
    assert_close(g_terms, g_batch, rtol=0, atol=1e-12)


def test_per_sample_terms_split_in_two_shards_with_the_global_mean_equal_one_batch():
    # two ranks of 6 rows each, with p̄ of all 12 (what _global_mean all-reduces): the mean of
    # the two shard means is the batch TCM, and the summed gradients are the batch gradient
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    rho = torch.softmax(logits, dim=1)
    p_bar = rho.mean(0).detach()
    shards = [tcm_terms(rho[:6], p_bar).mean(), tcm_terms(rho[6:], p_bar).mean()]
    assert_close((shards[0] + shards[1]) / 2, tcm(rho), rtol=0, atol=1e-12)
    (g_shards,) = torch.autograd.grad((shards[0] + shards[1]) / 2, logits, retain_graph=True)
    (g_batch,) = torch.autograd.grad(tcm(rho), logits)
    assert_close(g_shards, g_batch, rtol=0, atol=1e-12)


def test_tcm_gradient_stays_finite_where_the_softmax_underflows():
    # float32 softmax of [0, 200] is exactly [0, 1]: ∂(p log p)/∂p = log p + 1 = −∞ at p = 0,
    # times ∂p/∂y = 0 gives NaN (as in the official TCM); from log-softmax it is 0
    logits = torch.tensor([[0.0, 200.0], [150.0, 0.0], [1.0, 2.0]], requires_grad=True)
    ones = torch.ones(3, 2)
    rho = refine(logits, ones)
    assert rho[0, 0].item() == 0.0
    (bad,) = torch.autograd.grad(tcm_terms(rho, rho.mean(0)).mean(), logits)
    assert not bool(torch.isfinite(bad).all())
    log_rho = log_refine(logits, ones)
    rho = log_rho.exp()
    (good,) = torch.autograd.grad(tcm_terms(rho, rho.mean(0), log_rho).mean(), logits)
    assert bool(torch.isfinite(good).all())
    # where nothing underflows, both forms agree
    assert_close(good[2], bad[2])


# -- refinement ---------------------------------------------------------------------------------
def test_refine_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    d = torch.tensor([[0.2, 0.6], [0.5, 1.0]], dtype=torch.float64)
    # bayes, row 0: p = [½, ½] → p ⊙ D = [0.1, 0.3] → [¼, ¾]
    assert_close(refine(logits, d, "bayes")[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    # logits (official rho_pred, then TCM's softmax), row 1: y ⊙ D = [1, 1] → [½, ½]
    assert_close(refine(logits, d, "logits")[1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # D = 1 everywhere: both are the plain softmax
    ones = torch.ones_like(d)
    assert_close(refine(logits, ones, "bayes"), torch.softmax(logits, 1))
    assert_close(refine(logits, ones, "logits"), torch.softmax(logits, 1))
    for mode in ("logits", "bayes"):
        assert_close(log_refine(logits, d, mode).exp(), refine(logits, d, mode))
    with pytest.raises(ValueError, match="pareto-da: refine"):
        refine(logits, d, "posterior")  # type: ignore[arg-type]


def test_official_rho_pred_then_tcm_equals_refine_logits_then_tcm():
    # official: rho = y_t * softmax(cd_t, dim=2)[:, :, 0]; loss = −TCM(rho) (softmax inside)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(10, 4, generator=g, dtype=torch.float64)
    cd = torch.randn(10, 4, 2, generator=g, dtype=torch.float64)
    d_target = torch.softmax(cd, dim=2)[:, :, 0]
    # one logit per class: softmax over two logits = sigmoid of their difference
    assert_close(torch.sigmoid(cd[:, :, 0] - cd[:, :, 1]), d_target)
    assert_close(tcm(refine(y, d_target, "logits")), official_tcm(y * d_target), rtol=0, atol=1e-12)


# -- gradient reversal ---------------------------------------------------------------------------
def test_grl_coefficient_follows_the_warm_start_schedule():
    assert grl_coefficient(0, 500) == 0.0
    # i = N: 2/(1 + e^{-1}) − 1 = tanh(1/2) = 0.462117
    assert grl_coefficient(500, 500) == pytest.approx(math.tanh(0.5), abs=1e-12)
    assert grl_coefficient(10**6, 500) == pytest.approx(1.0)
    assert grl_coefficient(10**6, 500, hi=0.3) == pytest.approx(0.3)


def test_reverse_gradient_keeps_the_value_and_flips_the_gradient():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    out = reverse_gradient(x, 0.25)
    assert torch.equal(out, x.detach())
    out.pow(2).sum().backward()  # d/dx of Σ x² is 2x, reversed and scaled: −0.25 · 2x
    assert_close(x.grad, torch.tensor([-0.75, 1.0]))


# -- the discriminators' losses ------------------------------------------------------------------
def test_domain_bce_by_hand():
    # logits 0: BCE = log 2 for either label; ½ (log 2 + log 2) = log 2
    assert_close(domain_bce(torch.zeros(3), torch.zeros(3)), torch.full((3,), math.log(2)))
    # source logit +∞-ish and target −∞-ish: a perfect discriminator has loss ≈ 0
    assert domain_bce(torch.tensor([30.0]), torch.tensor([-30.0])).item() < 1e-12


def test_class_domain_bce_by_hand():
    # C = 2, one row; all logits 0 (BCE = log 2 each). Source: only class y = 0's
    # discriminator, log 2. Target: Σ_k ρ_k log 2 = log 2. ½ (log 2 + log 2) / C = log(2) / 2
    s = torch.zeros(1, 2)
    out = class_domain_bce(s, s, torch.tensor([0]), torch.tensor([[0.25, 0.75]]))
    assert_close(out, torch.tensor([math.log(2) / 2]))
    # a confident, right discriminator of class 1 on a target row with ρ = e_1: ≈ 0 target part
    s_t = torch.tensor([[0.0, 30.0]])
    out = class_domain_bce(
        torch.tensor([[-30.0, 0.0]]), s_t, torch.tensor([0]), torch.tensor([[0.0, 1.0]])
    )
    assert out.item() < 1e-12


def test_class_discriminators_are_c_independent_networks():
    torch.manual_seed(0)
    discs = Discriminators(dim=5, num_classes=3, hidden=7)
    f = torch.randn(4, 5)
    out = discs.class_logits(f)
    assert out.shape == (4, 3)
    c = discs.classes
    for k in range(3):  # network k by hand
        h = torch.relu(f @ c.weights[0][k] + c.biases[0][k])
        h = torch.relu(h @ c.weights[1][k] + c.biases[1][k])
        assert_close(out[:, k], (h @ c.weights[2][k] + c.biases[2][k]).squeeze(-1))
    assert discs.domain_logit(f).shape == (4,)
