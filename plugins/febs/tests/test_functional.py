"""FEBS and the equity-scaled metric as functions: hand-derived values and the official formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from paperhooks_febs import (
    equity_scaled,
    febs_dice,
    febs_value_and_grad,
    febs_weights,
    group_losses,
    group_sums,
    hard_dice_per_sample,
    per_sample_sums,
)

T1 = math.tanh(1.0)  # 0.761594: the weight of the best group


# -- group weights -------------------------------------------------------------------------------
def test_weights_of_losses_02_and_04():
    # the notes' unit check: min L / L = [1, 0.5] → [tanh 1, tanh 0.5] = [0.761594, 0.462117]
    L, present = torch.tensor([0.2, 0.4]), torch.tensor([True, True])
    assert_close(
        febs_weights(L, present, 1.0), torch.tensor([0.761594, 0.462117]), atol=1e-6, rtol=0
    )
    # γ = 2: [1, 0.25] → [0.761594, tanh 0.25 = 0.244919]; γ = 0: both tanh 1 (no fairness term)
    assert_close(
        febs_weights(L, present, 2.0), torch.tensor([0.761594, 0.244919]), atol=1e-6, rtol=0
    )
    assert_close(febs_weights(L, present, 0.0), torch.tensor([T1, T1]))


def test_absent_groups_stay_out_of_the_min_and_a_perfect_group_gets_ratio_one():
    # group 1 absent: min over groups 0, 2 = 0.3 → [tanh 1, tanh 1 (unused), tanh 0.5]
    w = febs_weights(torch.tensor([0.3, 0.0, 0.6]), torch.tensor([True, False, True]), 1.0)
    assert_close(w, torch.tensor([T1, T1, math.tanh(0.5)]))
    # L = [0, 0.5]: the perfect group is the min (0/0 taken as 1); the other gets tanh(0) = 0
    assert_close(
        febs_weights(torch.tensor([0.0, 0.5]), torch.tensor([True, True]), 1.0),
        torch.tensor([T1, 0.0]),
    )
    # equal losses: every group gets tanh 1
    assert_close(
        febs_weights(torch.full((3,), 0.7), torch.ones(3, dtype=torch.bool), 1.0),
        torch.full((3,), T1),
    )


# -- Dice sums and group losses --------------------------------------------------------------------
# Two samples, two classes, one pixel each: p = [0.8, 0.2] with target 0 (group 0) and
# p = [0.4, 0.6] with target 1 (group 1).
P2 = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
Y2 = torch.tensor([0, 1])
G2 = torch.tensor([0, 1])


def test_per_sample_sums_and_group_losses_by_hand():
    s = per_sample_sums(P2, Y2)  # (Σ p t, Σ p², Σ t²) per class
    assert_close(
        s,
        torch.tensor([[[0.8, 0.64, 1.0], [0.0, 0.04, 0.0]], [[0.0, 0.16, 0.0], [0.6, 0.36, 1.0]]]),
    )
    S = group_sums(s, G2, 2)
    # group 0: dice_0 = 1 − (1.6 + s)/(1.64 + s) = 0.024390; dice_1 = 1 − s/(0.04 + s) = 0.999750
    # group 1: dice_0 = 1 − s/(0.16 + s) = 0.999938; dice_1 = 1 − (1.2 + s)/(1.36 + s) = 0.117646
    count, present = group_losses(S, "count")
    assert_close(count, torch.tensor([1.024140, 1.117584]), atol=2e-6, rtol=0)
    skip, _ = group_losses(S, "skip")  # only the class each group contains
    assert_close(skip, torch.tensor([0.024390, 0.117646]), atol=2e-6, rtol=0)
    assert present.tolist() == [True, True]
    # weights: skip → [tanh 1, tanh(0.024390/0.117646 = 0.207318) = 0.204397];
    # count → [tanh 1, tanh(1.024140/1.117584 = 0.916388) = 0.724184]
    assert_close(febs_weights(skip, present), torch.tensor([T1, 0.204397]), atol=2e-6, rtol=0)
    assert_close(febs_weights(count, present), torch.tensor([T1, 0.724184]), atol=2e-6, rtol=0)


def test_febs_dice_scales_each_groups_predictions():
    S = group_sums(per_sample_sums(P2, Y2), G2, 2)
    w = torch.tensor([0.5, 1.0])
    # scaled predictions [0.4, 0.1] and [0.4, 0.6]:
    # class 0: I = 0.4, Z = 0.16 + 0.16 = 0.32, Y = 1 → 1 − (0.8 + s)/(1.32 + s) = 0.393937
    # class 1: I = 0.6, Z = 0.01 + 0.36 = 0.37, Y = 1 → 1 − (1.2 + s)/(1.37 + s) = 0.124087
    # mean over the 2 classes: 0.259012
    assert_close(febs_dice(S, w), torch.tensor(0.259012), atol=2e-6, rtol=0)


# -- agreement with the official febs_loss (conftest.py) ----------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("absent", ["count", "skip"])
def test_loss_and_gradient_match_the_official_febs_loss(gamma, absent, official_febs_loss):
    # 3 classes on 6×6 label maps, 3 groups, every class in every group: "skip" and "count"
    # give the official weights (they differ only by the factor C)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, 6, 6, generator=g, requires_grad=True)
    target = torch.randint(3, (9, 6, 6), generator=g)
    attr = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    expected = official_febs_loss(logits, target, attr, 3, gamma)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    s = per_sample_sums(logits.softmax(dim=1), target)  # [9, 3, 3]
    group = torch.as_tensor(attr)
    loss, dS, w, L = febs_value_and_grad(group_sums(s.detach(), group, 3), gamma, absent)
    assert_close(loss, expected.detach(), atol=1e-6, rtol=0)
    # the plugin's per-sample terms: ⟨∂L/∂S_{a_i}, s_i⟩; their sum has the loss's gradient
    u = (dS[group] * s).sum()
    (grad,) = torch.autograd.grad(u, logits)
    assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)


def test_sums_of_two_shards_give_the_whole_batch_gradient():
    # What 2 ranks do: each sums its samples per group, the sums are added (all-reduce), each
    # rank's linearized terms carry its samples' share; summed over ranks = the whole gradient.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 4, generator=g, requires_grad=True)
    target, group = torch.randint(4, (10,), generator=g), torch.tensor([0, 1] * 5)
    s = per_sample_sums(logits.softmax(dim=1), target)
    shards = [slice(0, 4), slice(4, 10)]
    S = sum(group_sums(s[k].detach(), group[k], 2) for k in shards)
    whole, dS, w, _ = febs_value_and_grad(S, 1.0)
    (expected,) = torch.autograd.grad(
        febs_dice(group_sums(s, group, 2), w), logits, retain_graph=True
    )
    got = sum(
        torch.autograd.grad((dS[group[k]] * s[k]).sum(), logits, retain_graph=True)[0]
        for k in shards
    )
    assert_close(got, expected)


# -- the equity-scaled metric -----------------------------------------------------------------------
def test_equity_scaled_by_hand():
    # the notes' check: overall 0.8, groups [0.85, 0.75]: 0.8/(1 + 0.05 + 0.05) = 0.727273
    overall, groups = (
        torch.tensor(0.8, dtype=torch.float64),
        torch.tensor([0.85, 0.75], dtype=torch.float64),
    )
    assert_close(
        equity_scaled(overall, groups),
        torch.tensor(0.727273, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    # std variant: sample std of [0.85, 0.75] = 0.070711 → 0.8/1.070711 = 0.747167
    assert_close(
        equity_scaled(overall, groups, spread="std"),
        torch.tensor(0.747167, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    # α = 0 ignores the groups; equal groups leave the overall untouched
    assert_close(equity_scaled(overall, groups, alpha=0.0), overall)
    assert_close(equity_scaled(overall, torch.full((3,), 0.8, dtype=torch.float64)), overall)


def test_hard_dice_per_image_by_hand():
    # 2×2 maps, classes 0-2. Image 0: class 1 predicted {a, b}, true {a}: 2·1/(2 + 1) = 0.666667;
    # class 2 predicted {c}, true {c, d}: 2·1/(1 + 2) = 0.666667 → 0.666667.
    # Image 1: class 1 predicted, absent from the target → 1 (the code's convention);
    # class 2 in the target, never predicted → 0 → 0.5.
    pred = torch.tensor([[[1, 1], [2, 0]], [[1, 0], [0, 0]]])
    true = torch.tensor([[[1, 0], [2, 2]], [[0, 0], [2, 0]]])
    assert_close(
        hard_dice_per_sample(pred, true, 3), torch.tensor([2 / 3, 0.5], dtype=torch.float64)
    )


def test_mismatched_shapes_raise_naming_the_plugin():
    with pytest.raises(ValueError, match="febs: probabilities"):
        per_sample_sums(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
