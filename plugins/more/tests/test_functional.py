"""The formulas: hand-derived values, the official code's formulas restated, torchjd's MGDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torchjd.aggregation import MGDA

from paperhooks.gradients import min_norm_weights
from paperhooks_more import (
    PreferenceCalibrationError,
    ema,
    loss_coefficients,
    min_norm_lambda,
    normalized_gram,
    pair_losses,
    pair_probabilities,
    ranking_loss,
    scores_from_target,
    task_pair_counts,
    uniform_lambda,
)

ALL = torch.tensor([True, True])


def lam_of(*rows: list[float], normalize: str = "none") -> torch.Tensor:
    g = torch.tensor(rows, dtype=torch.float64)
    return min_norm_lambda(
        normalized_gram(g @ g.T, normalize), torch.ones(len(rows), dtype=torch.bool)
    )


# -- min-norm weights, two tasks by hand ---------------------------------------------------------
def test_two_orthogonal_unit_gradients_get_equal_weights():
    # α* = clip(((g₂ − g₁)·g₂)/‖g₁ − g₂‖², 0, 1) = ((−1, 1)·(0, 1))/2 = 1/2
    assert_close(lam_of([1.0, 0.0], [0.0, 1.0]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_a_gradient_inside_the_other_takes_all_the_weight():
    # g₁ = (1, 0), g₂ = (2, 0): ((g₂ − g₁)·g₂)/‖g₁ − g₂‖² = ((1, 0)·(2, 0))/1 = 2 → clipped to 1: all on g₁
    assert_close(lam_of([1.0, 0.0], [2.0, 0.0]), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_an_interior_two_task_solution_equalizes_the_inner_products():
    # g₁ = (2, 0), g₂ = (0, 1): α* = ((−2, 1)·(0, 1))/‖(2, −1)‖² = 1/5, so λ = (0.2, 0.8) and
    # d = 0.2·g₁ + 0.8·g₂ = (0.4, 0.8): ⟨d, g₁⟩ = ⟨d, g₂⟩ = ‖d‖² = 0.8 (MGDA's optimality)
    lam = lam_of([2.0, 0.0], [0.0, 1.0])
    assert_close(lam, torch.tensor([0.2, 0.8], dtype=torch.float64))
    d = lam @ torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert_close(d, torch.tensor([0.4, 0.8], dtype=torch.float64))
    # after MORE's L2 normalization both are unit vectors, and two unit vectors always get ½, ½
    assert_close(
        lam_of([2.0, 0.0], [0.0, 1.0], normalize="l2"),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
    )


def test_normalized_gram_divides_by_the_norms_and_leaves_a_zero_row_alone():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # norms 5, 0 (counted as 1, as gradient_normalizer does), 2: ĝ = (0.6, 0.8), 0, (0, 1)
    expected = torch.tensor(
        [[1.0, 0.0, 0.8], [0.0, 0.0, 0.0], [0.8, 0.0, 1.0]], dtype=torch.float64
    )
    assert_close(normalized_gram(g @ g.T, "l2"), expected)
    assert torch.equal(normalized_gram(g @ g.T, "none"), g @ g.T)


def test_absent_tasks_get_no_weight_and_a_single_task_gets_all():
    gram = torch.eye(3, dtype=torch.float64)
    assert_close(
        min_norm_lambda(gram, torch.tensor([True, False, True])),
        torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64),
    )
    assert_close(
        min_norm_lambda(gram, torch.tensor([False, True, False])),
        torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
    )
    assert_close(
        uniform_lambda(torch.tensor([True, False, True])),
        torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64),
    )


# -- the official solver (min_norm_solvers.py @ f60b993), restated ----------------------------------
def official_from2(v1v1: float, v1v2: float, v2v2: float) -> float:
    """``MinNormSolver._min_norm_element_from2``: note the 0.999 / 0.001 instead of 1 / 0."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def official_fw(gram: np.ndarray, max_iter: int = 1000, stop: float = 1e-5) -> np.ndarray:
    """``MinNormSolver.find_min_norm_element_FW`` on the Gram matrix: the best pair first,
    then Frank–Wolfe towards the vertex argmin_t (Cλ)_t, returning the previous point on
    convergence."""
    n = gram.shape[0]
    dmin, sol = 1e8, None
    for i in range(n):
        for j in range(i + 1, n):
            c = official_from2(gram[i, i], gram[i, j], gram[j, j])
            d = c * c * gram[i, i] + 2 * c * (1 - c) * gram[i, j] + (1 - c) ** 2 * gram[j, j]
            if d < dmin:
                dmin, sol = d, (i, j, c)
    lam = np.zeros(n)
    lam[sol[0]], lam[sol[1]] = sol[2], 1 - sol[2]
    if n < 3:
        return lam
    for _ in range(max_iter):
        t = int(np.argmin(gram @ lam))
        nc = official_from2(lam @ gram @ lam, lam @ gram[:, t], gram[t, t])
        new = nc * lam
        new[t] += 1 - nc
        if np.abs(new - lam).sum() < stop:
            return lam
        lam = new
    return lam


def test_the_solver_matches_the_official_frank_wolfe_away_from_the_simplex_boundary():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for k in (3, 4, 5):
        for _ in range(8):
            g = torch.randn(k, 6, generator=gen, dtype=torch.float64)
            g = torch.cat([g[:1], -0.5 * g[:1] + g[1:]])  # conflicts with the first row
            gram = normalized_gram(g @ g.T, "l2")
            ours = min_norm_lambda(gram, torch.ones(k, dtype=torch.bool))
            theirs = torch.from_numpy(official_fw(gram.numpy()))
            if bool((ours > 0.01).all()):  # interior: the official 0.999/0.001 clipping never fires
                assert_close(ours, theirs, atol=2e-5, rtol=0)
                checked += 1
    assert checked >= 6


def test_the_official_solver_stops_short_of_the_boundary_where_ours_reaches_it():
    # g₁ = (1, 0), g₂ = (2, 0): the official pair solver returns γ = 0.999, not 1
    gram = np.array([[1.0, 2.0], [2.0, 4.0]])
    assert np.allclose(official_fw(gram), [0.999, 0.001])
    assert_close(lam_of([1.0, 0.0], [2.0, 0.0]), torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_the_min_norm_point_matches_torchjd_mgda_and_the_interior_closed_form(k):
    """On L2-normalized gradients whose min-norm point lies inside the simplex, where
    Frank–Wolfe converges linearly (on a face it zig-zags and 1e-6 takes very long):
    there λ* = C⁻¹1 / 1ᵀC⁻¹1 (the KKT conditions with every λ_t > 0)."""
    gen = torch.Generator().manual_seed(10 + k)
    found = 0
    while found < (2 if k < 5 else 1):
        g = torch.randn(k, 7, generator=gen, dtype=torch.float64)
        g = g / g.norm(dim=1, keepdim=True)  # the normalized EMAs MORE solves on
        gram = g @ g.T
        x = torch.linalg.solve(gram, torch.ones(k, dtype=torch.float64))
        if not bool((x > 0.02 * x.sum()).all()):
            continue
        found += 1
        exact = (x / x.sum()) @ g
        ours = min_norm_weights(gram, max_iter=5000, tol=1e-10) @ g
        theirs = MGDA(epsilon=1e-9, max_iters=100_000)(g)
        assert_close(ours, theirs, atol=1e-6, rtol=0)
        assert_close(ours, exact, atol=1e-8, rtol=0)
        # the plugin's own budget (official MAX_ITER 1000, STOP_CRIT 1e-5) lands close by
        lam = min_norm_lambda(gram, torch.ones(k, dtype=torch.bool))
        assert_close(lam @ g, exact, atol=1e-4, rtol=0)


# -- the EMA and the rescaling ------------------------------------------------------------------------
def test_ema_keeps_mostly_the_newest_gradient():
    # m₁ = 0.01·0 + 0.99·(1, 0) = (0.99, 0); m₂ = 0.01·(0.99, 0) + 0.99·(0, 1) = (0.0099, 0.99)
    m = ema(torch.zeros(2), torch.tensor([1.0, 0.0]), 0.99)
    m = ema(m, torch.tensor([0.0, 1.0]), 0.99)
    assert_close(m, torch.tensor([0.0099, 0.99]))


def official_more_ranking_loss(logits, scores, weights, task_mask):
    """``more_ranking_loss`` (trainer.py @ e7baee6, ``resampling=False``): per-row weights,
    summed pair losses over the ordered-pair mask, × number of tasks present / pairs."""
    logits_diff = logits.unsqueeze(1) - logits.unsqueeze(2)
    larger = (scores.unsqueeze(1) > scores.unsqueeze(2)) * 1.0
    smaller = (scores.unsqueeze(1) < scores.unsqueeze(2)) * 1.0
    pad = (scores >= 0).unsqueeze(1) * 1.0 * (scores >= 0).unsqueeze(2)
    total_mask = (larger + smaller) * pad
    log_prob = torch.nn.functional.logsigmoid(logits_diff * (larger - smaller) * pad)
    total = 0.0
    for w, row in zip(weights, range(log_prob.shape[0]), strict=True):
        total += -w * (log_prob[row] * total_mask[row]).sum()
    total = total * len(set(task_mask))
    pairs = total_mask.sum()
    return total / pairs if pairs > 0 else total


def official_ranking_loss(logits, scores):
    """``ranking_loss`` (trainer.py @ e7baee6): both orders of each pair, pads (score < 0) out."""
    return official_more_ranking_loss(logits, scores, [1.0] * logits.shape[0], [0])


def test_ranking_loss_matches_the_official_one_with_three_responses_and_padding():
    rewards = torch.tensor([[0.3, -1.2, 0.5], [2.0, 0.1, 0.0], [0.2, 0.4, -0.3]])
    scores = torch.tensor([[1.0, 0.5, 0.2], [0.3, 0.9, -1.0], [0.5, 0.5, 0.1]])  # a pad; a tie
    s, n = pair_losses(rewards, scores)
    # pairs: row 0: 3; row 1: 1 (response 2 is padding); row 2: 2 (the tie 0 ~ 1 is no pair)
    assert n.tolist() == [3, 1, 2]
    # row 1: response 1 beats 0: −log σ(0.1 − 2.0)
    assert_close(s[1], -torch.nn.functional.logsigmoid(torch.tensor(0.1 - 2.0)))
    assert_close(ranking_loss(rewards, scores), official_ranking_loss(rewards, scores))


def test_coefficients_reproduce_the_official_rescaled_loss_on_unbalanced_tasks():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(7, 2, generator=gen)
    scores = scores_from_target(torch.zeros(7, dtype=torch.int64), 2)
    task = torch.tensor([0, 0, 0, 0, 2, 2, 0])  # N = (5, 0, 2): task 1 absent
    lam = torch.tensor([0.3, 0.0, 0.7], dtype=torch.float64)
    s, n = pair_losses(rewards, scores)
    counts = task_pair_counts(n, task, 3)
    assert counts.tolist() == [5.0, 0.0, 2.0]
    per_task = torch.stack(
        [s[task == t].sum() / counts[t].clamp_min(1) for t in range(3)]
    ).double()  # L_t
    ours = (loss_coefficients(lam, counts) @ per_task).float()
    theirs = official_more_ranking_loss(rewards, scores, lam[task].tolist(), task.tolist())
    assert_close(ours, theirs)
    # c_t = λ_t · T' · N_t / N = (0.3·2·5/7, 0, 0.7·2·2/7)
    assert_close(
        loss_coefficients(lam, counts), torch.tensor([3 / 7, 0.0, 2.8 / 7], dtype=torch.float64)
    )
    # without reweighting (λ = 1/T'), Σ c_t L_t is the plain mean over all pairs
    plain = loss_coefficients(uniform_lambda(counts > 0), counts) @ per_task
    assert_close(plain.float(), ranking_loss(rewards, scores))


# -- the ECE (utils.py calibration_error and trainer_utils.py compute_metrics @ 7aae1c6) -------------
def official_ece(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> float:
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(bins[1:-1], y_prob)
    bin_sums = np.bincount(ids, weights=y_prob, minlength=len(bins))
    bin_true = np.bincount(ids, weights=y_true, minlength=len(bins))
    return float(np.abs(bin_sums - bin_true).sum() / len(y_prob))


@pytest.mark.parametrize("n_bins", [5, 10, 20])
def test_the_ece_equals_the_official_one_over_both_orders_of_each_pair(n_bins):
    gen = torch.Generator().manual_seed(n_bins)
    rewards = 2 * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    batch = {"target": torch.randint(2, (200,), generator=gen)}
    metric = PreferenceCalibrationError(n_bins=n_bins)
    metric.update({"logits": rewards[:120].float()}, {"target": batch["target"][:120]})
    metric.update({"logits": rewards[120:].float()}, {"target": batch["target"][120:]})
    # official: every ordered pair (i, j) with s_j ≠ s_i, label 1[s_j > s_i], prob σ(r_j − r_i)
    scores = scores_from_target(batch["target"], 2).double()
    diff = rewards.unsqueeze(1) - rewards.unsqueeze(2)
    larger = scores.unsqueeze(1) > scores.unsqueeze(2)
    mask = larger | (scores.unsqueeze(1) < scores.unsqueeze(2))
    y_true, y_prob = larger[mask].double().numpy(), torch.sigmoid(diff)[mask].numpy()
    assert_close(
        metric.compute().double(),
        torch.tensor(official_ece(y_true, y_prob, n_bins), dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_the_ece_of_a_calibrated_and_of_an_overconfident_model_by_hand():
    # margin 0 (p = ½): each pair gives (½, label 1) and (½, label 0), all in one bin:
    # |Σp − Σy| = |2 − 2| = 0
    metric = PreferenceCalibrationError(n_bins=10)
    metric.update({"logits": torch.zeros(2, 2)}, {"target": torch.zeros(2, dtype=torch.int64)})
    assert metric.compute().item() == 0.0
    # margin log 3 (p = ¾): bins of ¾ (label 1) and ¼ (label 0): |¾ − 1|·½ + |¼ − 0|·½ = ¼
    metric.reset()
    metric.update(
        {"logits": torch.tensor([[float(np.log(3.0)), 0.0]])},
        {"target": torch.zeros(1, dtype=torch.int64)},
    )
    assert_close(metric.compute(), torch.tensor(0.25))
    assert_close(
        pair_probabilities(torch.tensor([[float(np.log(3.0)), 0.0]]), torch.tensor([[1.0, 0.0]])),
        torch.tensor([0.75]),
    )
