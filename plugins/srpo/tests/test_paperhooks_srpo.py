"""Tests of ``srpo``: hand-derived values, the closed-form optimum of the min-max objective, the
third-party TRL PR #1772 formula, revision sequences and their masks, refusals, and the
conformance runs on the causal-LM task. The effect (revisions beat drafts): ``test_effect.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.preference import PreferenceObjective
from paperhooks.run import fit
from paperhooks.tasks.preference import EOS, PAD
from paperhooks.testing.conformance import (
    PREFERENCE_TASK,
    check_ddp_equals_single,
    check_entry_point,
    check_family,
    check_few_steps,
    check_metadata,
    check_recipe_roundtrip,
    check_resume,
)
from paperhooks.testing.preference import preference_batch, preference_module
from paperhooks_srpo import (
    Srpo,
    SrpoConfig,
    prompt_length_of,
    response_rows,
    revise,
    revision_batch,
    revision_sequences,
    srpo_losses,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "srpo.yaml"
#: the kit's preference task with room for a revision sequence: W = 2 + 6 + 1 = 9, L = 2 → 2W − L = 16
SRPO_TASK = {**PREFERENCE_TASK, "model": {**PREFERENCE_TASK["model"], "max_positions": 16}}
KIT = {"alpha": 0.8}


def _plugin(**kw) -> Srpo:
    p = Srpo(SrpoConfig(**kw))
    p.name = "srpo"
    return p


def _module(beta: float = 0.1, reference: str = "model", perturb: bool = True, rows: int = 8):
    dm, batch = preference_batch(rows=rows)
    module = preference_module(
        dm,
        model_config={"max_positions": 16},
        objective=PreferenceObjective(beta=beta, reference=reference),
    )
    if perturb:  # a policy different from the reference, so that the log-ratios are not 0
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return dm, batch, module


# -- the kit, on the causal-LM preference task ------------------------------------------------------------
def test_entry_point_metadata_and_recipe_round_trip():
    check_metadata(check_entry_point("srpo"), "srpo")
    check_recipe_roundtrip("srpo", {"alpha": 0.5, "preference_prob": 0.9})
    assert Srpo.replaces_task_loss and not Srpo.paper.verified


def test_family_properties_hold_on_the_preference_task():
    check_family("srpo", KIT, task=SRPO_TASK)


def test_few_steps_stay_finite(tmp_path):
    check_few_steps("srpo", KIT, tmp_path, task=SRPO_TASK)


def test_resume_is_bit_identical(tmp_path):
    check_resume("srpo", KIT, tmp_path, task=SRPO_TASK)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process(tmp_path):
    # atol 1e-5 as for the other preference plugins: Adam's per-coordinate √v turns 1e-9
    # all-reduce order differences into ~1e-6 on weights whose gradients are near 0
    check_ddp_equals_single("srpo", KIT, tmp_path, task=SRPO_TASK, atol=1e-5)


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process(tmp_path):
    check_ddp_equals_single("srpo", KIT, tmp_path, strategy="fsdp2", task=SRPO_TASK, atol=1e-5)


def test_recipe_file_validates():
    recipe = R.load(RECIPE)
    assert [p.name for p in recipe.plugins] == ["srpo"]
    assert recipe.plugins[0].config == SrpoConfig(alpha=0.8, preference_prob=1.0)
    assert recipe.model.config.max_positions == 16


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"alpha": "0.8"}, "alpha"),
    ({"alpha": True}, "alpha"), ({"preference_prob": 0.4}, "preference_prob"), ({"preference_prob": 1.01}, "preference_prob"),
])  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SrpoConfig\.{field} must be a number in"):
        SrpoConfig(**kwargs)


# -- the loss by hand -------------------------------------------------------------------------------------
def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_losses_by_hand():
    # β = 0.5, p = 1 (targets p − ½ = ½ and 2p − 1 = 1):
    #   r†(w|l) = 3, r†(l|l) = 1, r†(w|w) = 0, r†(l|w) = 1, r(w) = 1, r(l) = 2
    #   L_self = (0.5·(3 − 1) − 0.5)² + (0.5·(0 − 1) − 0.5)² = 0.5² + (−1)² = 1.25
    #   L_gen  = (0.5·(3 + 1 − 1 − 2) − 1)² = (−0.5)² = 0.25
    #   α = 0.25: L_α = 0.25·1.25 + 0.75·0.25 = 0.5
    args = (_t(3.0), _t(1.0), _t(0.0), _t(1.0), _t(1.0), _t(2.0))
    loss, s, g = srpo_losses(*args, beta=0.5, alpha=0.25)
    assert_close((loss, s, g), (_t(0.5), _t(1.25), _t(0.25)))
    # p = ¾ (targets ¼ and ½): L_self = (1 − 0.25)² + (−0.5 − 0.25)² = 0.5625 + 0.5625 = 1.125,
    #   L_gen = (0.5 − 0.5)² = 0
    loss, s, g = srpo_losses(*args, beta=0.5, alpha=0.25, preference_prob=0.75)
    assert_close((loss, s, g), (_t(0.25 * 1.125), _t(1.125), _t(0.0)))
    # p = ½ (no preference: every target 0): L_self = 1² + (−0.5)² = 1.25, L_gen = 0.5² = 0.25
    loss, s, g = srpo_losses(*args, beta=0.5, alpha=0.25, preference_prob=0.5)
    assert_close((s, g), (_t(1.25), _t(0.25)))
    # α = 1 is L_self alone, α = 0 is L_gen alone
    assert_close(srpo_losses(*args, beta=0.5, alpha=1.0)[0], _t(1.25))
    assert_close(srpo_losses(*args, beta=0.5, alpha=0.0)[0], _t(0.25))


def test_gradient_by_hand():
    # The numbers of test_losses_by_hand, β = 0.5, α = ½. Inside the squares: a = 0.5 (first of
    # L_self), b = −1 (second of L_self), c = −0.5 (L_gen).
    #   ∂L_self/∂r†(w|l) = 2aβ = 0.5,   ∂L_gen/∂r†(w|l) = 2cβ = −0.5    → ½·0.5 + ½·(−0.5) = 0
    #   ∂L_self/∂r†(l|w) = −2bβ = 1,    ∂L_gen/∂r†(l|w) = −2cβ = 0.5    → ½·1 + ½·0.5 = 0.75
    #   ∂L_gen/∂r(w) = 2cβ = −0.5, ∂L_gen/∂r(l) = 0.5                  → −0.25 and 0.25
    x = [_t(v).requires_grad_() for v in (3.0, 1.0, 0.0, 1.0, 1.0, 2.0)]
    srpo_losses(*x, beta=0.5, alpha=0.5)[0].sum().backward()
    assert_close(x[0].grad, _t(0.0))
    assert_close(x[3].grad, _t(0.75))
    assert_close(x[4].grad, _t(-0.25))
    assert_close(x[5].grad, _t(0.25))


# -- the optimum of the min-max objective -----------------------------------------------------------------
def _toy(beta: float):
    """3 responses, a general (non-transitive-capable) preference P[i, j] = P(i ≻ j) with P + Pᵀ = 1,
    a reference generator π_ref(y) and a reference reviser π_ref(y'|y) (rows: y)."""
    P = torch.tensor([[0.5, 0.8, 0.3], [0.2, 0.5, 0.65], [0.7, 0.35, 0.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    ref_gen = torch.rand(3, generator=g, dtype=torch.float64) + 0.2
    ref_gen /= ref_gen.sum()
    ref_rev = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.2
    ref_rev /= ref_rev.sum(1, keepdim=True)
    rev_star, gen_star, Z = _optimum(P, ref_gen, ref_rev, beta)
    return P, ref_gen, ref_rev, rev_star, gen_star, Z


def _optimum(P, ref_gen, ref_rev, beta: float):
    """(π†*, π*, Z) of the module docstring's derivation, for P[i, j] = P(i ≻ j)."""
    # inner max: π†*(y'|y) ∝ π_ref(y'|y) exp(P(y' ≻ y)/β); Z(y) its normalizer
    tilted = ref_rev * torch.exp(P.T / beta)  # [y, y']: P(y' ≻ y) = P[y', y]
    Z = tilted.sum(1)
    rev_star = tilted / Z[:, None]
    # outer min: π*(y) ∝ π_ref(y) / Z(y)
    gen_star = ref_gen / Z
    return rev_star, gen_star / gen_star.sum(), Z


def _inner(pi_rev_y: torch.Tensor, y: int, P, ref_rev, beta: float) -> torch.Tensor:
    """E_{y'∼π†(·|y)} P(y' ≻ y) − β KL(π†(·|y) ‖ π_ref(·|y))."""
    return (pi_rev_y * P[:, y]).sum() - beta * (pi_rev_y * (pi_rev_y / ref_rev[y]).log()).sum()


def test_closed_form_solves_the_min_max_objective():
    beta = 0.3
    P, ref_gen, ref_rev, rev_star, gen_star, Z = _toy(beta)
    g = torch.Generator().manual_seed(1)
    for y in range(3):
        best = _inner(rev_star[y], y, P, ref_rev, beta)
        assert_close(best, beta * Z[y].log())  # the value β log Z(x, y)
        for _ in range(50):  # any other distribution does worse
            other = rev_star[y] * torch.exp(0.5 * torch.randn(3, generator=g, dtype=torch.float64))
            assert _inner(other / other.sum(), y, P, ref_rev, beta) < best
    outer = lambda pi: (pi * beta * Z.log()).sum() + beta * (pi * (pi / ref_gen).log()).sum()  # noqa: E731
    for _ in range(50):
        other = gen_star * torch.exp(0.5 * torch.randn(3, generator=g, dtype=torch.float64))
        assert outer(other / other.sum()) > outer(gen_star)
    # the identities of the module doc, at (π*, π†*): I1 for every y, y', y''; I2 with the MINUS sign,
    # β r†(y'|y) − β r(y) = P(y' ≻ y) + c, c = β log Σ_y π_ref(y)/Z(y) (here c ≈ −0.543), for all 9 (y, y')
    r_rev, r_gen = (rev_star / ref_rev).log(), (gen_star / ref_gen).log()  # r_rev[y, y'] = r†(y'|y)
    i1 = beta * (r_rev[:, :, None] - r_rev[:, None, :]) - (P.T[:, :, None] - P.T[:, None, :])
    assert_close(i1, torch.zeros_like(i1))
    c = beta * (ref_gen / Z).sum().log()
    assert_close(
        beta * r_rev - beta * r_gen[:, None] - P.T,
        torch.full((3, 3), float(c), dtype=torch.float64),
    )
    plus = beta * r_rev + beta * r_gen[:, None] - P.T  # the sign written before: not a constant
    assert float(plus.max() - plus.min()) > 0.02


def _revision_gains(rewards, beta: float, ref_rev):
    """At the optimum (π*, π†*) for Bradley-Terry preferences P(i ≻ j) = σ(r_i − r_j) and a uniform
    reference generator: (E r of π*'s drafts, of their 1st revision by π†*, of the 2nd, and
    E P(y' ≻ y) of the 1st revision over its draft)."""
    P = torch.sigmoid(rewards[:, None] - rewards[None, :])
    n = len(rewards)
    rev, gen, _ = _optimum(P, torch.full((n,), 1.0 / n, dtype=torch.float64), ref_rev, beta)
    first = gen @ rev
    wins = (gen[:, None] * rev * P.T).sum()
    return float(gen @ rewards), float(first @ rewards), float(first @ rev @ rewards), float(wins)


def test_at_the_optimum_own_drafts_improve_only_with_a_draft_dependent_reference():
    """Why the effect test's own drafts do not improve, and what makes them improve (the card).

    64 responses with rewards r ∼ N(0, 1) (10 draws), Bradley-Terry preferences, β ∈ {0.05, 0.1,
    0.3}, the exact optimum of the min-max objective:

    - **A reference reviser that ignores the draft**, π_ref(y'|x, y) = π_ref(y'|x) (uniform), like
      the toy's randomly initialized 1-layer GPT-2: the optimal reviser does not raise the reward
      of the optimal generator's drafts. Measured over the 30 cases: E r(1st revision) − E r(draft)
      from −0.51 to +0.048, mean −0.034; E P(y' ≻ y) from 0.465 to 0.519. The generator π* ∝
      π_ref/Z(y) already plays the drafts the reviser cannot beat.
    - **A reference reviser that copies the draft** with probability ρ (else uniform), as a
      pretrained LM repeats its context: every one of the 90 cases (ρ ∈ {0.2, 0.5, 0.9}) gains
      at the 1st revision (by 0.090 at least) and again at the 2nd (by 0.022 at least), the
      paper's Fig. 3 pattern.
    """
    gains_free, wins_free = [], []
    for seed in range(10):
        r = torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for beta in (0.05, 0.1, 0.3):
            uniform = torch.full((64, 64), 1 / 64, dtype=torch.float64)
            draft, first, _, wins = _revision_gains(r, beta, uniform)
            gains_free.append(first - draft)
            wins_free.append(wins)
            for rho in (0.2, 0.5, 0.9):
                copying = rho * torch.eye(64, dtype=torch.float64) + (1 - rho) * uniform
                draft, first, second, _ = _revision_gains(r, beta, copying)
                assert first - draft > 0.05 and second > first + 0.01, (
                    seed,
                    beta,
                    rho,
                    draft,
                    first,
                    second,
                )
    assert max(gains_free) < 0.06 and sum(gains_free) / len(gains_free) < 0, gains_free
    assert 0.45 < min(wins_free) and max(wins_free) < 0.53, wins_free


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_loss_is_zero_at_the_closed_form_optimum_and_not_elsewhere(alpha):
    """Log-ratios of (π*, π†*) make every regression exact, for every pair with p = P(y_w ≻ y_l)."""
    beta = 0.3
    P, ref_gen, ref_rev, rev_star, gen_star, _ = _toy(beta)
    r_rev = (rev_star / ref_rev).log()  # r†(y'|y) at [y, y']
    r_gen = (gen_star / ref_gen).log()

    def loss(r_rev, r_gen, w, lo):
        return srpo_losses(r_rev[lo, w], r_rev[lo, lo], r_rev[w, w], r_rev[w, lo], r_gen[w], r_gen[lo],
                           beta=beta, alpha=alpha, preference_prob=float(P[w, lo]))[0]  # fmt: skip

    pairs = [(w, lo) for w in range(3) for lo in range(3) if w != lo and P[w, lo] >= 0.5]
    assert len(pairs) == 3
    for w, lo in pairs:
        assert abs(float(loss(r_rev, r_gen, w, lo))) < 1e-20
    # the reference itself (log-ratios 0) is not optimal: every pair has p > ½
    assert all(float(loss(torch.zeros(3, 3), torch.zeros(3), w, lo)) > 1e-3 for w, lo in pairs)


# -- agreement with the third-party implementation --------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.8, 0.3])
def test_equals_trl_pr_1772_formula(alpha):
    """The formula of the unmerged third-party TRL PR #1772 (``srpo_loss`` in
    trl/trainer/srpo_trainer.py @ 680f611, hard labels), restated here independently from
    reading it (its code is not copied): given_rejected = (½ − β(r†(w|l) − r†(l|l)))²,
    given_chosen = (½ − β(r†(w|w) − r†(l|w)))², generative = (β(r†(w|l) + r(w) − r†(l|w) − r(l)) − 1)²,
    loss = (1 − α)·generative + α·(given_rejected + given_chosen)."""
    g = torch.Generator().manual_seed(4)
    w_l, l_l, w_w, l_w, r_w, r_l = (
        10 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(6)
    )
    beta = 0.1
    given_rejected = (0.5 - beta * (w_l - l_l)) ** 2
    given_chosen = (0.5 - beta * (w_w - l_w)) ** 2
    generative = (beta * ((w_l + r_w) - (l_w + r_l)) - 1) ** 2
    theirs = (1 - alpha) * generative + alpha * (given_rejected + given_chosen)
    ours, s, gen = srpo_losses(
        w_l, l_l, w_w, l_w, r_w, r_l, beta=beta, alpha=alpha, preference_prob=1.0
    )
    assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    assert_close(s, given_rejected + given_chosen, atol=1e-12, rtol=1e-12)


# -- revision sequences and masks ------------------------------------------------------------------------
def test_revision_sequence_layout():
    dm, batch = preference_batch(rows=8)
    L, W = dm.prompt_length, batch["chosen_ids"].shape[1]
    assert prompt_length_of(batch["chosen_mask"]) == L == 2
    ids, attention, mask = revision_batch(batch, L)
    b = 8
    assert ids.shape == attention.shape == mask.shape == (4 * b, 2 * W - L)
    blocks = [
        ("chosen", "rejected"),
        ("rejected", "rejected"),
        ("chosen", "chosen"),
        ("rejected", "chosen"),
    ]
    for k, (target, context) in enumerate(blocks):
        for i in range(b):
            row = k * b + i
            ctx_ids, ctx_att = batch[f"{context}_ids"][i], batch[f"{context}_attention"][i]
            # the context: the whole row of y, padding as PAD, every position attended, never counted
            assert torch.equal(ids[row, :W], torch.where(ctx_att.bool(), ctx_ids, PAD))
            assert bool((attention[row, :W] == 1).all()) and bool((mask[row, :W] == 0).all())
            # then y' without its prompt: its tokens, its EOS; the mask is 1 exactly on them
            n = int(batch[f"{target}_mask"][i].sum())  # content + EOS
            tail = batch[f"{target}_ids"][i, L:]
            assert torch.equal(ids[row, W : W + n], tail[:n]) and int(ids[row, W + n - 1]) == EOS
            assert torch.equal(mask[row, W:], (torch.arange(W - L) < n).float())
            assert torch.equal(attention[row, W:], batch[f"{target}_attention"][i, L:])
            assert bool((ids[row, W + n :] == PAD).all())


def test_revision_log_ratios_match_sequences_built_by_hand():
    """r†(y_w|y_l) of the plugin equals log π − log π_ref of y_w's tokens and EOS after the
    rejected row, summed position by position from a sequence assembled here."""
    dm, batch, module = _module()
    L, W = dm.prompt_length, batch["chosen_ids"].shape[1]
    i = 3
    n = int(batch["chosen_mask"][i].sum())
    seq = torch.cat([batch["rejected_ids"][i], batch["chosen_ids"][i, L : L + n]])[
        None
    ]  # PADs of the row kept
    with torch.no_grad():
        pol = module.model(seq, torch.ones_like(seq))[0, W : W + n].sum()
        ref = module.reference_model(seq, torch.ones_like(seq))[0, W : W + n].sum()
        ids, attention, mask = revision_batch(batch, L)
        rev = (module.model(ids, attention) * mask).sum(1) - (
            module.reference_model(ids, attention) * mask
        ).sum(1)
    assert_close(rev[i], pol - ref, atol=1e-5, rtol=0)  # block 0 is y_w | y_l
    assert abs(float(pol - ref)) > 1e-3


def test_padding_never_counts():
    """Padding tokens of the rows (attention 0) may hold anything: the loss does not move."""
    dm, batch, module = _module()
    plugin = _plugin(alpha=0.8)
    before = plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=None
    )["loss"]
    changed = {k: v.clone() for k, v in batch.items()}
    for side in ("chosen", "rejected"):
        pad = changed[f"{side}_attention"] == 0
        assert pad.any()
        changed[f"{side}_ids"][pad] = 7  # a content token where the padding was
    after = plugin.objective_terms(
        module=module, batch=changed, outputs=module.outputs(changed), ctx=None
    )["loss"]
    assert_close(after, before, atol=1e-6, rtol=0)


def test_plugin_terms_equal_the_functional_on_the_modules_log_ratios():
    dm, batch, module = _module(beta=0.2)
    out = module.outputs(batch)
    L = dm.prompt_length
    ids, attention, mask = revision_batch(batch, L)
    with torch.no_grad():
        rev = (module.model(ids, attention) * mask).sum(1) - (
            module.reference_model(ids, attention) * mask
        ).sum(1)
    expected = srpo_losses(*rev.chunk(4), out["chosen_logps"] - out["ref_chosen_logps"],
                           out["rejected_logps"] - out["ref_rejected_logps"], beta=0.2, alpha=0.6, preference_prob=0.9)[0]  # fmt: skip
    got = _plugin(alpha=0.6, preference_prob=0.9).objective_terms(
        module=module, batch=batch, outputs=out, ctx=None
    )["loss"]
    assert_close(got.detach(), expected.detach(), atol=1e-5, rtol=1e-6)
    got.sum().backward()  # the policy's revision forward carries the gradient
    assert all(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is None for p in module.reference_model.parameters())


def test_reference_none_uses_zero_reference_terms():
    dm, batch, module = _module(reference="none")
    out = module.outputs(batch)
    ids, attention, mask = revision_batch(batch, dm.prompt_length)
    with torch.no_grad():
        rev = (module.model(ids, attention) * mask).sum(1)
    expected = srpo_losses(
        *rev.chunk(4), out["chosen_logps"], out["rejected_logps"], beta=0.1, alpha=0.8
    )[0]
    got = _plugin().objective_terms(module=module, batch=batch, outputs=out, ctx=None)["loss"]
    assert_close(got.detach(), expected, atol=1e-5, rtol=1e-6)


def test_logs_its_terms_and_the_improvement_accuracy():
    from paperhooks.context import StepContext

    dm, batch, module = _module()
    ctx = StepContext()
    _plugin(alpha=0.8).objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=ctx
    )
    assert set(ctx.logged) == {"srpo/self_loss", "srpo/gen_loss", "srpo/improvement_acc"}
    assert 0.0 <= float(ctx.logged["srpo/improvement_acc"]) <= 1.0


# -- sampling revisions -----------------------------------------------------------------------------------
def test_response_rows_and_revise_keep_the_layout():
    dm, batch, module = _module()
    L, W = dm.prompt_length, batch["chosen_ids"].shape[1]
    # a response as long as the row allows, one cut after 6 tokens, and an empty one
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [4, 0, 0, 0, 0, 0, 0], [0] * 7])
    rows, att = response_rows(batch["chosen_ids"][:3, :L], tokens, torch.tensor([7, 1, 0]), W)
    assert rows.tolist()[0] == [*batch["chosen_ids"][0, :L].tolist(), 5, 6, 7, 8, 9, 10, EOS]
    assert (
        rows.tolist()[1][L:] == [4, EOS, 0, 0, 0, 0, 0] and rows.tolist()[2][L:] == [EOS] + [0] * 6
    )
    assert att.sum(1).tolist() == [W, L + 2, L + 1]
    # revising twice: same prompts, the layout of a data row, reproducible from the generator
    g = torch.Generator().manual_seed(0)
    r1, a1, t1, n1 = revise(module.model, rows, g, prompt_length=L, attention=att)
    r2, a2, t2, n2 = revise(module.model, r1, g, prompt_length=L, attention=a1)
    for r, a, n in ((r1, a1, n1), (r2, a2, n2)):
        assert r.shape == (3, W) and torch.equal(r[:, :L], rows[:, :L])
        assert torch.equal(r[torch.arange(3), L + n], torch.full((3,), EOS)) and torch.equal(
            a.sum(1), L + n + 1
        )
        assert bool((r[:, L:] != PAD).sum(1).eq(n + 1).all())  # content and EOS, then padding only
    again = revise(
        module.model, rows, torch.Generator().manual_seed(0), prompt_length=L, attention=att
    )[0]
    assert torch.equal(again, r1)


# -- refusals ---------------------------------------------------------------------------------------------
def _fit(tmp_path, *over):
    return fit(R.load(RECIPE, [f"run_dir={tmp_path}", "trainer.enable_progress_bar=false", "trainer.max_steps=1",
                               "trainer.limit_val_batches=0", *over]))  # fmt: skip


def test_refuses_a_precomputed_reference_before_training(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"srpo cannot use objective\.reference 'precomputed'.*use 'model' or 'none'",
    ):
        _fit(tmp_path, "objective.reference=precomputed")


def test_refuses_a_policy_without_room_for_revisions_naming_the_recipe_key(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"16 tokens, the policy attends over 9 positions; set model\.max_positions: 16",
    ):
        _fit(tmp_path, "model.max_positions=0")


def test_refuses_tabular_data(tmp_path):
    with pytest.raises(
        ValueError, match=r"srpo needs a causal-LM policy over token sequences.*tabular-preferences"
    ):
        raw = R.load_raw(
            RECIPE,
            [f"run_dir={tmp_path}", "trainer.enable_progress_bar=false", "trainer.max_steps=1"],
        )
        raw.update(model={"name": "tabular-policy"}, data={"name": "tabular-preferences"})
        fit(R.validate(raw))


def test_refuses_non_preference_outputs():
    with pytest.raises(ValueError, match="srpo: needs a preference task"):
        _plugin().objective_terms(
            module=None, batch={}, outputs={"logits": torch.zeros(2, 3)}, ctx=None
        )


def test_refuses_prompts_of_different_widths():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="fixed-width prompts"):
        prompt_length_of(mask)
    with pytest.raises(ValueError, match="nonzero inside the prompt"):
        revision_sequences(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.long),
                           torch.ones(2, 4), mask, prompt_length=2)  # fmt: skip
