"""The SRAT functional forms, with values worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from paperhooks_srat import (
    batch_hard_triplet,
    class_weights,
    linearize,
    pairwise_distances,
    triplet_value_and_grad,
)


# -- class weights -------------------------------------------------------------------------------
def test_inverse_weights_of_counts_100_and_10():
    # 1/n = [0.01, 0.1], Σ = 0.11; scaled to Σ_c w_c = C = 2: [0.02/0.11, 0.2/0.11] = [0.1818, 1.8182]
    assert_close(
        class_weights(torch.tensor([100.0, 10.0])),
        torch.tensor([0.181818, 1.818182], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_effective_number_weights_of_counts_100_and_10():
    # E_n = (1 − β^n)/(1 − β), β = 0.9999: β^100 = e^(100 ln β) = e^(−0.0100005) = 0.9900498 → E = 99.502;
    # β^10 = e^(−0.00100005) = 0.9990005 → E = 9.9950. 1/E = [0.0100500, 0.1000500], Σ = 0.1101000
    # → ×2/Σ = [0.182561, 1.817439]
    w = class_weights(torch.tensor([100.0, 10.0]), "effective", beta=0.9999)
    assert_close(w, torch.tensor([0.182561, 1.817439], dtype=torch.float64), atol=2e-6, rtol=0)
    beta = 0.9999
    e = torch.tensor([(1 - beta**n) / (1 - beta) for n in (100, 10)], dtype=torch.float64)
    assert_close(w, (1 / e) / (1 / e).sum() * 2)  # the closed form, computed directly


def test_effective_weights_span_uniform_to_inverse():
    counts = torch.tensor([50.0, 5.0, 1.0])
    # β = 0: E_n = 1 for every n → uniform; β → 1: E_n → n → inverse frequency
    assert_close(class_weights(counts, "effective", beta=0.0), torch.ones(3, dtype=torch.float64))
    assert_close(
        class_weights(counts, "effective", beta=1 - 1e-12),
        class_weights(counts, "inverse"),
        rtol=1e-6,
        atol=0,
    )


def test_uncounted_classes_count_as_one():
    # [0, 4] → n = [1, 4] → 1/n = [1, 0.25], Σ = 1.25 → ×2/1.25 = [1.6, 0.4]
    assert_close(
        class_weights(torch.tensor([0.0, 4.0])), torch.tensor([1.6, 0.4], dtype=torch.float64)
    )


def test_equal_counts_give_weight_one_each():
    assert_close(class_weights(torch.full((5,), 7.0)), torch.ones(5, dtype=torch.float64))


def test_unknown_scheme_raises_naming_the_plugin():
    with pytest.raises(ValueError, match="srat.*inverse, effective"):
        class_weights(torch.ones(2), "sqrt")


# -- the triplet term --------------------------------------------------------------------------
# Four points in the plane, not normalized:  z0 = (0,0), z1 = (1,0) of class 0; z2 = (0,2), z3 = (3,0)
# of class 1. Squared distances: d01 = 1, d02 = 4, d03 = 9, d12 = 5, d13 = 4, d23 = 13.
Z4 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
Y4 = torch.tensor([0, 0, 1, 1])


def test_pairwise_distances_of_four_points():
    expected = torch.tensor(
        [[0, 1, 4, 9], [1, 0, 5, 4], [4, 5, 0, 13], [9, 4, 13, 0]], dtype=torch.float32
    )
    assert_close(pairwise_distances(Z4, normalize=False), expected)


def test_batch_hard_triplet_of_four_points():
    # anchor 0: hardest positive d01 = 1, hardest negative min(d02, d03) = 4 → [0.2 + 1 − 4]_+ = 0
    # anchor 1: d10 = 1, min(d12, d13) = 4 → 0
    # anchor 2: d23 = 13, min(d20, d21) = 4 → 0.2 + 13 − 4 = 9.2
    # anchor 3: d32 = 13, min(d30, d31) = min(9, 4) = 4 → 9.2
    assert_close(
        batch_hard_triplet(Z4, Y4, margin=0.2, normalize=False), torch.tensor([0.0, 0.0, 9.2, 9.2])
    )
    # margin 4: anchors 0 and 1 become active: 4 + 1 − 4 = 1
    assert_close(
        batch_hard_triplet(Z4, Y4, margin=4.0, normalize=False),
        torch.tensor([1.0, 1.0, 13.0, 13.0]),
    )


def test_batch_hard_triplet_on_normalized_features():
    # unit vectors at angles 0°, 60° (class 0) and 90°, 180° (class 1); d = 2 − 2 cos Δθ:
    # d(0°,60°) = 1, d(0°,90°) = 2, d(0°,180°) = 4, d(60°,90°) = 2 − √3 = 0.26795, d(60°,180°) = 3,
    # d(90°,180°) = 2. Scaled copies give the same numbers (normalize divides the length out).
    ang = torch.tensor([0.0, 60.0, 90.0, 180.0]) * math.pi / 180
    z = torch.stack([ang.cos(), ang.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    # anchor 0°: pos 1, neg min(2, 4) = 2 → [0.2 + 1 − 2]_+ = 0
    # anchor 60°: pos 1, neg min(0.26795, 3) → 0.2 + 1 − 0.26795 = 0.93205
    # anchor 90°: pos 2, neg min(2, 0.26795) → 0.2 + 2 − 0.26795 = 1.93205
    # anchor 180°: pos 2, neg min(4, 3) = 3 → [0.2 + 2 − 3]_+ = 0
    assert_close(
        batch_hard_triplet(z, Y4, margin=0.2),
        torch.tensor([0.0, 0.93205, 1.93205, 0.0]),
        atol=1e-5,
        rtol=0,
    )


def test_anchors_without_a_triplet_give_zero():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert_close(
        batch_hard_triplet(z, torch.zeros(5, dtype=torch.long)), torch.zeros(5)
    )  # one class
    # class 2 has a single sample: no positive for it, but it is still a negative for the others
    y = torch.tensor([0, 0, 1, 1, 2])
    ell = batch_hard_triplet(z, y, margin=10.0)
    assert ell[4] == 0 and bool((ell[:4] > 0).all())


def test_identical_features_have_finite_gradients():
    # duplicates at distance 0 (squared distances have no sqrt, so no 0/0 in the gradient)
    z = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [-1.0, 0.5]], requires_grad=True)
    ell = batch_hard_triplet(z, torch.tensor([0, 0, 1, 1]))
    ell.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_value_and_grad_match_autograd_on_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 4, generator=g, requires_grad=True)
    y = torch.randint(3, (12,), generator=g)
    direct = batch_hard_triplet(z, y, 0.5)
    (expected,) = torch.autograd.grad(direct.sum(), z)
    ell, G = triplet_value_and_grad(z, y, 0.5)
    assert_close(ell, direct.detach())
    assert_close(G, expected)
    assert not ell.requires_grad and not G.requires_grad


def test_linearized_terms_on_two_shards_give_the_whole_batch_gradient():
    # What two ranks compute: each holds 5 of the 10 rows, all ranks compute ℓ and G on the
    # gathered features, each keeps its rows. The sum of the shards' gradients (DDP averages them,
    # the mean over samples divides by N) must equal the gradient of the whole-batch loss.
    g = torch.Generator().manual_seed(2)
    z = torch.randn(10, 3, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    (expected,) = torch.autograd.grad(batch_hard_triplet(z, y, 1.0).mean(), z)
    ell, G = triplet_value_and_grad(z, y, 1.0)
    shards = [slice(0, 5), slice(5, 10)]
    terms = [linearize(ell[s], G[s], z[s]) for s in shards]
    assert_close(torch.cat(terms).detach(), ell)  # values are ℓ exactly
    got = sum(torch.autograd.grad(t.mean() / len(shards), z, retain_graph=True)[0] for t in terms)
    assert_close(got, expected)
