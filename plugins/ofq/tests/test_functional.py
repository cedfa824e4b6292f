"""StatsQ, CGA's mask and the oscillation tracker on small tensors, values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from paperhooks_ofq import (
    Oscillations,
    StatsQ,
    cga_keep_mask,
    pre_round,
    statsq,
    statsq_codes,
    statsq_scale,
    track_oscillations,
)


def test_statsq_of_the_notes_unit_check_by_hand():
    # W = [0.1, −0.3, 0.2, −0.4], b = 2 → n = 2; s = 2·mean|W| = 2·0.25 = 0.5
    # c = W/s = [0.2, −0.6, 0.4, −0.8]; u = 2c − 0.5 = [−0.1, −1.7, 0.3, −2.1]
    # q = round(u) = [0, −2, 0, −2]; W_q = 0.5·(q + 0.5)/2 = [0.125, −0.375, 0.125, −0.375]
    w = torch.tensor([[0.1, -0.3, 0.2, -0.4]])
    assert_close(statsq_scale(w), torch.tensor([[0.5]]))
    assert_close(pre_round(w, 2)[0], torch.tensor([[-0.1, -1.7, 0.3, -2.1]]))
    assert torch.equal(statsq_codes(w, 2), torch.tensor([[0.0, -2.0, 0.0, -2.0]]))
    assert torch.equal(
        statsq(w, 2), torch.tensor([[0.125, -0.375, 0.125, -0.375]])
    )  # exactly on the grid


def test_statsq_is_per_row_clamps_outliers_and_has_no_zero_level():
    # row 0: [1, 0, 0, 0]: s = 2·0.25 = 0.5, W/s = [2, 0, 0, 0] → c = [1 − 1e-6, 0, 0, 0]
    #   b = 3 → n = 4: u = 4c − 0.5 = [3.499996, −0.5, −0.5, −0.5] → q = [3, −0, −0, −0]
    #   (round half to even) → W_q = 0.5·(q + 0.5)/4 = [0.4375, 0.0625, 0.0625, 0.0625]
    # row 1: [−2, 2, −2, 2]·0.1: s = 0.4, c = [−0.5, 0.5, −0.5, 0.5], u = [−2.5, 1.5, −2.5, 1.5]
    #   → q = [−2, 2, −2, 2] (half to even) → W_q = 0.4·(q + 0.5)/4 = [−0.15, 0.25, −0.15, 0.25]
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-0.2, 0.2, -0.2, 0.2]])
    assert_close(statsq_scale(w), torch.tensor([[0.5], [0.4]]))
    assert_close(
        statsq(w, 3), torch.tensor([[0.4375, 0.0625, 0.0625, 0.0625], [-0.15, 0.25, -0.15, 0.25]])
    )


def test_a_zero_row_quantizes_to_zero_instead_of_nan():
    w = torch.tensor([[0.0, 0.0], [0.3, -0.1]])
    out = statsq(w, 2)
    assert torch.equal(out[0], torch.zeros(2)) and bool(torch.isfinite(out).all())


def test_conv_weights_get_one_scale_per_output_channel():
    w = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) - 11.5  # [out, in, kh, kw]
    s = statsq_scale(w)
    assert s.shape == (2, 1, 1, 1)
    assert_close(s.flatten(), 2 * w.abs().flatten(1).mean(1))


def test_the_straight_through_gradient_is_the_upstream_one_and_ignores_the_scale():
    # ∂(Σ a ⊙ W_q)/∂W = a: the STE passes the gradient unchanged, and s is detached, so no
    # term from ∂s/∂W (= 2·sign(W)/N per row) appears. Finite differences do not apply:
    # the forward is piecewise constant in W (its true derivative is 0 almost everywhere).
    w = torch.tensor([[0.1, -0.3, 0.2, -0.4], [0.5, 0.05, -0.7, 0.3]], requires_grad=True)
    a = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.25, -1.0, 2.0, -3.0]])
    (statsq(w, 2) * a).sum().backward()
    assert torch.equal(w.grad, a)


def test_cga_keeps_only_weights_within_r_of_a_used_boundary_by_hand():
    # s = 1 needs mean|W| = 0.5: five weights with Σ|W| = 2.5. b = 2, n = 2, u = 2W − 0.5:
    #   W = [0.5015, −0.002, 0.9995, −0.35, −0.647]
    #   u = [0.503, −0.504, 1.499, −1.2, −1.794],  q = round(u) = [1, −1, 1, −1, −2]
    # boundaries i + 0.5 for i in [min q, max q) = {−2, −1, 0}: −1.5, −0.5, 0.5
    #   0.503 is 0.003 from 0.5 → kept;  −0.504 is 0.004 from −0.5 → kept
    #   1.499 is near 1.5, but 1.5 separates codes 1 and 2 and no code 2 exists → frozen
    #   −1.2 (0.3 from −1.5) and −1.794 (0.294 from −1.5) → frozen
    w = torch.tensor([[0.5015, -0.002, 0.9995, -0.35, -0.647]])
    assert_close(statsq_scale(w), torch.tensor([[1.0]]))
    assert cga_keep_mask(w, 2, 0.005).tolist() == [[True, True, False, False, False]]
    # wider ranges: −1.794 is 0.294 and −1.2 is 0.3 from −1.5, so r = 0.2 keeps neither and
    # r = 0.35 keeps both; 1.499 stays frozen whatever r (no boundary at 1.5)
    assert cga_keep_mask(w, 2, 0.2).tolist() == [[True, True, False, False, False]]
    assert cga_keep_mask(w, 2, 0.35).tolist() == [[True, True, False, True, True]]


def test_cga_masks_the_gradient_of_frozen_weights_only():
    w = torch.tensor([[0.5015, -0.002, 0.9995, -0.35, -0.647]], requires_grad=True)
    keep = cga_keep_mask(w, 2, 0.005)
    out = statsq(w, 2, keep)
    assert torch.equal(out, statsq(w, 2))  # the forward value does not change
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]


def test_the_parametrization_anneals_only_in_a_training_forward_with_gradients():
    w = torch.tensor([[0.5015, -0.002, 0.9995, -0.35, -0.647]])
    q = StatsQ(2, 0.005)
    q(w)
    assert q.frozen is None  # not annealing
    q.anneal = True
    with torch.no_grad():
        q(w)
    assert q.frozen is None  # validation-like forward
    q.eval()
    q(w)
    assert q.frozen is None
    q.train()
    q(w)
    assert q.frozen.tolist() == [[False, False, True, True, True]] and torch.equal(q.before, w)


def test_oscillations_are_flips_back_against_the_previous_flip_by_hand():
    m = 0.01
    state = Oscillations.start(torch.tensor([0.0, 0.0, 0.0]))
    # t1: codes [1, 0, −1]: two flips, no previous direction → no oscillation
    #     direction = sign(prev − new) = [−1, 0, 1]
    state, osc, flips = track_oscillations(state, torch.tensor([1.0, 0.0, -1.0]), m)
    assert (osc, flips) == (0, 2) and state.direction.tolist() == [-1, 0, 1]
    # t2: codes [0, 0, −1]: weight 0 goes back (sign(1 − 0) = 1 against −1) → 1 oscillation
    state, osc, flips = track_oscillations(state, torch.tensor([0.0, 0.0, -1.0]), m)
    assert (osc, flips) == (1, 1)
    assert_close(state.ema, torch.tensor([0.01, 0.0, 0.0]))  # m·1 + (1 − m)·0
    # t3: codes [−1, 0, −2]: both keep their last direction (+1) → flips, no oscillation
    state, osc, flips = track_oscillations(state, torch.tensor([-1.0, 0.0, -2.0]), m)
    assert (osc, flips) == (0, 2)
    assert_close(state.ema, torch.tensor([0.0099, 0.0, 0.0]))  # (1 − m)·0.01
    assert state.codes.dtype == torch.int8 and state.codes.tolist() == [-1, 0, -2]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_stay_in_the_range_of_b_bits(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 32) * torch.rand(16, 1) * 3
    w[0, 0] = -100.0  # clamped to c = −1: u = −n − 0.5 rounds (half to even) to −n, n even
    q = statsq_codes(w, bits)
    n = 2 ** (bits - 1)
    assert q[0, 0] == -n
    assert int(q.min()) >= -n and int(q.max()) <= n - 1
    levels = (statsq(w, bits) / statsq_scale(w) * n - 0.5).round()
    assert torch.equal(levels, q)  # W_q / s = (q + 0.5)/n exactly recovers q
