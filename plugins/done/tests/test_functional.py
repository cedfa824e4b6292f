"""Tests of DONE's weights, running normalizer and plugin hooks, with values worked out by hand."""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

from paperhooks import Hooks
from paperhooks.context import StepContext
from paperhooks_done import (
    DONE,
    DONEConfig,
    closed_form_weights,
    coefficient,
    effective_sample_size,
    log_mean_exp,
    update_log_u,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
LOSSES = torch.tensor([0.0, LN2, LN4])  # exp(ℓ) = [1, 2, 4]


# -- the closed form of the KL-regularized inner maximum (Eq. 5) ----------------------------
def test_closed_form_weights_by_hand():
    # r = 1: exp(ℓ) = [1, 2, 4] → w = [1, 2, 4]/7
    assert_close(closed_form_weights(LOSSES, 1.0), torch.tensor([1 / 7, 2 / 7, 4 / 7]))
    # r = 2: exp(ℓ/2) = [1, √2, 2] → /(3 + √2 = 4.41421) = [0.22654, 0.32038, 0.45308]
    assert_close(
        closed_form_weights(LOSSES, 2.0),
        torch.tensor([0.22654, 0.32038, 0.45308]),
        atol=1e-5,
        rtol=0,
    )


def test_closed_form_maximizes_the_kl_regularized_objective_and_its_value_is_eq_6():
    # Σ w ℓ − r·KL(w ‖ 1/n) at w* equals r·log((1/n) Σ exp(ℓ/r)); for ℓ = [0, ln2, ln4], r = 1
    # that is log(7/3) = 0.84730. Random points of the simplex do no better.
    def objective(w: torch.Tensor, losses: torch.Tensor, r: float) -> torch.Tensor:
        n = losses.numel()
        return (w * losses).sum() - r * (torch.special.xlogy(w, w) + w * math.log(n)).sum()

    w = closed_form_weights(LOSSES, 1.0)
    assert_close(objective(w, LOSSES, 1.0), torch.tensor(math.log(7 / 3)))
    assert_close(log_mean_exp(LOSSES), torch.tensor(math.log(7 / 3), dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = torch.rand(3, generator=g)
        assert objective(v / v.sum(), LOSSES, 1.0) <= objective(w, LOSSES, 1.0) + 1e-6


def test_r_interpolates_between_uniform_and_the_worst_sample():
    losses = torch.tensor([0.3, 1.5, 2.0, 4.0])
    assert_close(closed_form_weights(losses, 1e6), torch.full((4,), 0.25), atol=1e-6, rtol=0)
    assert_close(closed_form_weights(losses, 1e-3), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    ess = [effective_sample_size(closed_form_weights(losses, r)) for r in (100.0, 2.0, 0.5, 0.1)]
    assert all(a > b for a, b in zip(ess, ess[1:], strict=False)), ess


def test_equal_and_zero_losses_give_uniform_weights():
    assert_close(closed_form_weights(torch.full((5,), 2.3), 0.01), torch.full((5,), 0.2))
    assert_close(closed_form_weights(torch.zeros(5), 1.0), torch.full((5,), 0.2))


def test_large_losses_and_small_r_do_not_overflow():
    losses = torch.tensor([1e4, 2e4, 3e4])
    w = closed_form_weights(losses, 0.5)
    assert torch.isfinite(w).all() and w[2] == 1.0
    assert math.isfinite(log_mean_exp(losses / 0.5).item())


# -- the running normalizer -------------------------------------------------------------------
def test_running_normalizer_by_hand():
    # β = 0.1, ĝ = 2, 4, 1: u₀ = 2 (first estimate); u₁ = 0.9·2 + 0.1·4 = 2.2, c₁ = 4/2.2 = 1.81818;
    # u₂ = 0.9·2.2 + 0.1·1 = 2.08, c₂ = 1/2.08 = 0.48077.
    log_g = [torch.tensor(math.log(v), dtype=torch.float64) for v in (2.0, 4.0, 1.0)]
    log_u = update_log_u(None, log_g[0], 0.1)
    assert_close(log_u.exp(), torch.tensor(2.0, dtype=torch.float64))
    assert_close(coefficient(log_g[0], log_u), torch.tensor(1.0, dtype=torch.float64))
    log_u = update_log_u(log_u, log_g[1], 0.1)
    assert_close(log_u.exp(), torch.tensor(2.2, dtype=torch.float64))
    assert_close(coefficient(log_g[1], log_u), torch.tensor(4 / 2.2, dtype=torch.float64))
    log_u = update_log_u(log_u, log_g[2], 0.1)
    assert_close(log_u.exp(), torch.tensor(2.08, dtype=torch.float64))
    assert_close(coefficient(log_g[2], log_u), torch.tensor(1 / 2.08, dtype=torch.float64))
    # β = 1 forgets the past: c = 1 at every step
    assert_close(update_log_u(log_u, log_g[1], 1.0), log_g[1])


# -- the plugin in the step ------------------------------------------------------------------
def step(hooks: Hooks, losses: torch.Tensor, step: int) -> torch.Tensor:
    """The core's steps 5–7 on per-sample losses: weights, global normalization, coefficients."""
    hooks.begin_step(step)
    w = hooks.sample_weights(losses, {})
    return hooks.total(hooks.reduce({"loss": losses}, w))


def test_plugin_loss_is_the_tracked_compositional_estimate_by_hand():
    # r = 1, β = 0.5.
    # step 0: ℓ = [0, ln2, ln4]. Weights exp(ℓ − max) = [1/4, 1/2, 1]; ĝ₀ = 7/3 = u₀, c₀ = 1.
    #   Loss Σ w ℓ / Σ w · c = (½ln2 + ln4)/1.75 = 10·ln2/7 = 0.99021,
    #   = (1/n) Σ exp(ℓ_i) ℓ_i / u₀ = (2 ln2 + 4 ln4)/3 / (7/3) = 10·ln2/7.
    # step 1: ℓ = [ln3, ln3]. ĝ₁ = 3, u₁ = ½·7/3 + ½·3 = 8/3, c₁ = 3/(8/3) = 9/8.
    #   Loss = ln3 · 9/8 = 1.23597 = (1/2)(3 ln3 + 3 ln3)/(8/3).
    plugin = DONE(DONEConfig(kl_reg=1.0, beta=0.5))
    plugin.name = "done"
    hooks = Hooks([plugin])
    ctx = hooks.ctx
    w = plugin.weighting_sample_weights(losses=LOSSES, ctx=ctx)
    assert_close(w, torch.tensor([0.25, 0.5, 1.0]))
    plugin.objweight_coefficients(objectives={}, ctx=ctx)  # consume this step's coefficient
    plugin.log_u, plugin.updates = None, 0
    assert_close(step(hooks, LOSSES, 0), torch.tensor(10 * LN2 / 7))
    assert_close(ctx.logged["done/coefficient"], torch.tensor(1.0))
    assert_close(step(hooks, torch.tensor([LN3, LN3]), 1), torch.tensor(9 * LN3 / 8))
    assert_close(ctx.logged["done/coefficient"], torch.tensor(9 / 8))
    assert_close(plugin.log_u.exp(), torch.tensor(8 / 3, dtype=torch.float64))
    assert plugin.updates == 2


def test_gradient_with_respect_to_each_loss_is_exp_l_over_r_over_n_u():
    # The SCGD direction: ∂loss/∂ℓ_i = exp(ℓ_i/r)/(n·u_t), weights and c_t held constant.
    # r = 2, β = 0.25; step 0 sets u₀ = mean exp(ℓ⁰/2); step 1 uses u₁ = ¾u₀ + ¼ĝ₁.
    plugin = DONE(DONEConfig(kl_reg=2.0, beta=0.25))
    plugin.name = "done"
    hooks = Hooks([plugin])
    l0 = torch.tensor([0.5, 1.0, 3.0, 0.2])
    step(hooks, l0, 0)
    l1 = torch.tensor([2.0, 0.1, 0.7, 1.3], requires_grad=True)
    step(hooks, l1, 1).backward()
    g0, g1 = (l0 / 2).exp().mean(), (l1.detach() / 2).exp().mean()
    u1 = 0.75 * g0 + 0.25 * g1
    assert_close(l1.grad, (l1.detach() / 2).exp() / (4 * u1))


def test_no_coefficient_without_a_weighting_call_and_each_one_used_once():
    plugin = DONE()
    ctx = StepContext()
    assert plugin.objweight_coefficients(objectives={"loss": torch.tensor(1.0)}, ctx=ctx) is None
    plugin.weighting_sample_weights(losses=LOSSES, ctx=ctx)
    got = plugin.objweight_coefficients(
        objectives={"loss": torch.tensor(1.0), "aux": torch.tensor(2.0)}, ctx=ctx
    )
    assert set(got) == {"loss", "aux"} and all(v == 1.0 for v in got.values())
    assert plugin.objweight_coefficients(objectives={"loss": torch.tensor(1.0)}, ctx=ctx) is None


def test_equal_and_zero_loss_batches_get_equal_weights():
    plugin = DONE(DONEConfig(kl_reg=0.01))
    for losses in (torch.zeros(6), torch.full((6,), 2.3)):
        w = plugin.weighting_sample_weights(losses=losses, ctx=StepContext())
        assert torch.equal(w, torch.ones(6))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_raise_naming_the_plugin(bad):
    with pytest.raises(ValueError, match="done: 1 per-sample losses"):
        DONE().weighting_sample_weights(losses=torch.tensor([1.0, bad, 3.0]), ctx=StepContext())


def test_state_round_trips_and_continues_identically():
    a = DONE(DONEConfig(beta=0.3))
    for s in range(3):
        a.weighting_sample_weights(
            losses=torch.rand(8, generator=torch.Generator().manual_seed(s)) * 3, ctx=StepContext()
        )
    b = DONE(DONEConfig(beta=0.3))
    b.load_state_dict(a.state_dict())
    assert b.updates == 3 and torch.equal(b.log_u, a.log_u)
    nxt = torch.tensor([0.3, 2.2, 1.1])
    assert torch.equal(
        a.weighting_sample_weights(losses=nxt, ctx=StepContext()),
        b.weighting_sample_weights(losses=nxt, ctx=StepContext()),
    )
    assert torch.equal(a.log_u, b.log_u)
    assert DONE().state_dict() == {"log_u": None, "updates": 0}


# -- config and metadata ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kl_reg": 0.0}, "kl_reg"),
        ({"kl_reg": -1.0}, "kl_reg"),
        ({"kl_reg": math.inf}, "kl_reg"),
        ({"kl_reg": "1"}, "kl_reg"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": True}, "beta"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DONEConfig.{field}"):
        DONEConfig(**kwargs)


def test_metadata_says_the_method_is_not_verified_against_the_paper():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="paperhooks") if ep.name == "done"]
    assert ep.load() is DONE
    assert DONE.family == "sample-weighting" and DONE.extra_families == ("objective-weighting",)
    assert DONE.paper.arxiv == "2308.00311" and DONE.paper.code == "none found"
    assert DONE.paper.verified is False and "reconstruction" in DONE.paper.checked_against


# -- 2 processes give what 1 process gives on the global batch --------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(11, generator=g) * 4 for _ in range(3)]  # 3 steps, split 5 + 6
    sizes = [5, 6]
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    worker = importlib.import_module("_done_ddp")
    mp.spawn(
        worker.steps_on_shard,
        args=(2, _free_port(), batches, sizes, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = worker.run_steps(batches, None)
    for s in range(3):
        assert_close(torch.cat([r["weights"][s] for r in ranks]), single["weights"][s])
    for r in ranks:  # global state and logs: identical on every rank and to 1 process
        assert_close(r["state"]["log_u"], single["state"]["log_u"])
        assert r["state"]["updates"] == 3
        for name, value in single["logged"].items():
            assert_close(r["logged"][name], value)


def test_another_objective_weighting_plugin_is_refused_naming_both():
    # DONE applies c_t through objweight_coefficients, which has one owner.
    from paperhooks.errors import IncompatiblePluginsError
    from paperhooks.manager import PluginSet
    from paperhooks.plugin import Plugin, hookimpl

    class Fixed(Plugin):
        family = "objective-weighting"

        @hookimpl
        def objweight_coefficients(self, objectives, ctx):
            return {"loss": 0.5}

    done, fixed = DONE(), Fixed()
    done.name, fixed.name = "done", "fixed"
    with pytest.raises(IncompatiblePluginsError, match="'done' and 'fixed'"):
        PluginSet([done, fixed])
