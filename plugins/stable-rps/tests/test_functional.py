"""The formulas of STABLE-RPS on small examples worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from paperhooks_stable_rps import (
    grad_divisor,
    hashednet_index,
    randomfold_index,
    scale_grad,
    shared_weight,
    slot_statistics,
    universal_hash,
)
from paperhooks_stable_rps.functional import P

A = torch.tensor([3, 5, 7])  # a₀, a₁, a₂ of H


def test_universal_hash_by_hand():
    # H(x) = ((3x + 5x² + 7) mod P) mod m
    # x = 0: 7;  x = 1: 15;  x = 2: 6 + 20 + 7 = 33;  x = 10: 30 + 500 + 7 = 537
    x = torch.tensor([0, 1, 2, 10])
    assert universal_hash(x, A, 10).tolist() == [7, 5, 3, 7]
    assert universal_hash(x, A, 4).tolist() == [3, 3, 1, 1]


def test_universal_hash_is_exact_where_int64_products_would_overflow():
    # the official code multiplies before reducing and wraps for large x; reduced mod P first
    # the value is the hash family's exact one (Python integers have no overflow)
    a = torch.tensor([2 * 10**9 + 1, 1_999_999_999, 12345])
    x = torch.tensor([3 * 10**9, 10**12, P + 5])
    want = [((int(a[0]) * v + int(a[1]) * v * v + int(a[2])) % P) % 1000 for v in x.tolist()]
    assert universal_hash(x, a, 1000).tolist() == want


def test_randomfold_by_hand_is_one_cyclic_shift_per_partition():
    # m = 4, positions 0..9: partitions ⌊ℓ/4⌋ = 0,0,0,0,1,1,1,1,2,2, offsets ℓ mod 4 = 0,1,2,3,0,1,2,3,0,1
    # H(0) = 7 mod 4 = 3, H(1) = 15 mod 4 = 3, H(2) = 33 mod 4 = 1
    # h = (H(partition) + offset) mod 4 = 3,0,1,2 | 3,0,1,2 | 1,2
    h = randomfold_index(torch.arange(10), 4, A)
    assert h.tolist() == [3, 0, 1, 2, 3, 0, 1, 2, 1, 2]
    # loads: slots 0 and 3 get 2 weights, slots 1 and 2 get 3 = ⌊10/4⌋ or ⌈10/4⌉
    assert torch.bincount(h, minlength=4).tolist() == [2, 3, 3, 2]


def test_hashednet_hashes_every_position_independently_by_hand():
    # h(ℓ) = H(ℓ) mod 4: ℓ = 0 → 3, 1 → 3, 2 → 1 (collisions that RANDOMFOLD avoids)
    assert hashednet_index(torch.arange(3), 4, A).tolist() == [3, 3, 1]


@pytest.mark.parametrize(("n", "m"), [(97, 97), (1000, 7), (1000, 333), (4096, 512)])
def test_randomfold_loads_are_floor_or_ceil_and_a_bijection_at_m_equal_n(n, m):
    g = torch.Generator().manual_seed(n + m)
    a = 2 * torch.randint(1, P // 2 - 1, (3,), generator=g) + 1
    loads = torch.bincount(randomfold_index(torch.arange(n), m, a), minlength=m)
    assert int(loads.min()) == n // m and int(loads.max()) == math.ceil(n / m)
    if m == n:
        assert sorted(randomfold_index(torch.arange(n), m, a).tolist()) == list(range(n))
        # HashedNet at m = n leaves slots empty (about 1/e of them): not Pareto-continuous
        assert (
            int((torch.bincount(hashednet_index(torch.arange(n), m, a), minlength=m) == 0).sum())
            > n // 5
        )


def test_shared_weight_by_hand():
    # z = [1, 2, 3], h = [[0, 2], [1, 0]], g = [[1, -1], [-1, 1]], λ = 0.5
    # W = λ g z[h] = 0.5·[[1, -3], [-2, 1]] = [[0.5, -1.5], [-1, 0.5]]
    z = torch.tensor([1.0, 2.0, 3.0])
    h = torch.tensor([[0, 2], [1, 0]])
    g = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert_close(shared_weight(z, h, g, 0.5), torch.tensor([[0.5, -1.5], [-1.0, 0.5]]))


def test_slot_statistics_and_every_scaler_mode_by_hand():
    # slot 0 ← λ = 1, 2; slot 1 ← λ = 3; slot 2 empty
    # c = [2, 1, 0], A = [3, 3, 0], B = [1 + 4, 9, 0] = [5, 9, 0]
    c, a, b = slot_statistics(torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0]), 3)
    assert c.tolist() == [2, 1, 0] and a.tolist() == [3, 3, 0] and b.tolist() == [5, 9, 0]
    want = {  # empty slots divide by 1
        "v1": [9 / 2, 9, 1],  # A²/c
        "v2": [3, 3, 1],  # A
        "v3": [3 / 2, 3, 1],  # A/c
        "v4": [math.sqrt(5), 3, 1],  # √B
        "v5": [5, 9, 1],  # B
        "none": [1, 1, 1],
    }
    for mode, s in want.items():
        assert_close(grad_divisor(c, a, b, mode), torch.tensor(s, dtype=torch.float64), msg=mode)


def test_gradient_of_z_is_the_scaled_sum_of_signed_weight_gradients_by_hand():
    # L = Σ C ⊙ W with W = λ g z[h]: ∂L/∂z_k = λ Σ_{ℓ→k} g_ℓ C_ℓ, then divided by s_k.
    # z = [1, 2, 3], h = [[0, 2], [1, 0]], g = [[1, -1], [-1, 1]], λ = 0.5, C = [[1, 2], [3, 4]]
    # slot 0 ← (0,0), (1,1): 0.5·(1·1 + 1·4) = 2.5;  slot 1 ← (1,0): 0.5·(−1·3) = −1.5
    # slot 2 ← (0,1): 0.5·(−1·2) = −1.0.   Unscaled gradient [2.5, −1.5, −1.0].
    h = torch.tensor([[0, 2], [1, 0]])
    g = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    cost = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (shared_weight(z, h, g.double(), 0.5) * cost).sum().backward()
    assert_close(z.grad, torch.tensor([2.5, -1.5, -1.0], dtype=torch.float64))

    # v1 with one λ: s = c λ² = [2·0.25, 0.25, 0.25] → scaled gradient [5, −6, −4]
    c, a, b = slot_statistics(h.reshape(-1), torch.full((4,), 0.5), 3)
    factor = 1.0 / grad_divisor(c, a, b, "v1")
    z2 = z.detach().clone().requires_grad_(True)
    w = shared_weight(scale_grad(z2, factor), h, g.double(), 0.5)
    assert torch.equal(w, shared_weight(z.detach(), h, g.double(), 0.5))  # forward untouched
    (w * cost).sum().backward()
    assert_close(z2.grad, torch.tensor([5.0, -6.0, -4.0], dtype=torch.float64))

    # finite differences of the unscaled map agree with autograd
    def loss(v):
        return float((shared_weight(v, h, g.double(), 0.5) * cost).sum())

    eps = 1e-6
    fd = [
        (loss(z.detach() + eps * e) - loss(z.detach() - eps * e)) / (2 * eps)
        for e in torch.eye(3, dtype=torch.float64)
    ]
    assert_close(torch.tensor(fd, dtype=torch.float64), z.grad, atol=1e-6, rtol=0)
