"""Tests of the ctrl-u functional, plugin and dataset, with values worked out by hand."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from paperhooks import HookedModule, Hooks, TaskModule
from paperhooks.context import StepContext
from paperhooks.dist import step_generator
from paperhooks.recipe import load as load_recipe
from paperhooks.tasks import DATASETS, build_datamodule
from paperhooks_ctrl_u import (
    U_MAX,
    CtrlU,
    CtrlUConfig,
    ambiguous_labels,
    ctrl_u_objective,
    kl_uncertainty,
    l1_uncertainty,
    penalty_term,
    uncertainty_weights,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "ctrl-u.yaml"


def plugin(**kwargs) -> CtrlU:
    p = CtrlU(CtrlUConfig(**kwargs))
    p.name = "ctrl-u"
    return p


# -- the functional form, by hand ------------------------------------------------------------
def test_kl_uncertainty_by_hand_and_as_the_official_call():
    # o = [0, 0] → p = [1/2, 1/2]; o' = [ln 3, 0] → p' = [3/4, 1/4]
    # KL(p' ‖ p) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 − 0.173287 = 0.130812; U = 0.1 · KL
    o = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    o2 = torch.tensor([[math.log(3.0), 0.0], [1.0, -2.0]])
    u = kl_uncertainty(o, o2, u_scale=0.1)
    assert_close(u, torch.tensor([0.0130812, 0.0]), atol=1e-7, rtol=0)
    # the official expression: KLDivLoss(reduction="none")(log_softmax(o_prim), softmax(o_aux)),
    # summed over the class dim, times u_scale
    official = (
        torch.nn.KLDivLoss(reduction="none")(torch.log_softmax(o, 1), torch.softmax(o2, 1)).sum(1)
        * 0.1
    )
    assert_close(u, official)


def test_kl_uncertainty_of_sequences_is_the_masked_mean_over_positions():
    # [B=1, T=3, C=2]: positions 0 and 2 as in the test above (KL 0.130812 and 0), position 1
    # masked out; the mean over the 2 kept positions is 0.065406
    o = torch.tensor([[[0.0, 0.0], [5.0, 0.0], [1.0, -2.0]]])
    o2 = torch.tensor([[[math.log(3.0), 0.0], [0.0, 5.0], [1.0, -2.0]]])
    u = kl_uncertainty(o, o2, u_scale=1.0, mask=torch.tensor([[1, 0, 1]]))
    assert_close(u, torch.tensor([0.065406]), atol=1e-6, rtol=0)


def test_l1_uncertainty_by_hand():
    # scalar predictions: |1 − 1.5| = 0.5, |2 − 0| = 2; vector predictions: mean over dims
    assert_close(
        l1_uncertainty(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.0])), torch.tensor([0.5, 2.0])
    )
    assert_close(
        l1_uncertainty(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])), torch.tensor([2.0])
    )
    with pytest.raises(ValueError, match="ctrl-u.*shape"):
        l1_uncertainty(torch.zeros(2), torch.zeros(3))


def test_weights_are_exp_minus_u_capped_at_u_max():
    u = torch.tensor([0.0, math.log(2.0), math.log(10.0), 1e4])
    assert_close(uncertainty_weights(u), torch.tensor([1.0, 0.5, 0.1, math.exp(-U_MAX)]))


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_penalty_term_times_the_weight_is_scale_u_in_value_and_gradient(scale):
    # w t = scale·U in value, and ∂(w t)/∂U = scale, also above U_MAX where w is held constant
    u = torch.tensor([0.0, 0.3, 2.0, 49.0, 60.0, 1e3], dtype=torch.float64, requires_grad=True)
    w = uncertainty_weights(u)
    t = penalty_term(u, w, scale)
    assert_close(w * t, scale * u)
    (grad,) = torch.autograd.grad((w * t).sum(), u)
    assert_close(grad, torch.full_like(grad, scale))
    # a plain scale·U/w would also pass gradient through w: ∂ = scale(1 − U) below U_MAX
    u2 = u.detach().clone().requires_grad_(True)
    w2 = uncertainty_weights(u2)
    (naive,) = torch.autograd.grad((w2 * (scale * u2 / w2.detach())).sum(), u2)
    assert not torch.allclose(naive, grad)


def test_objective_is_loss_times_exp_minus_u_plus_penalty():
    # ℓ = [2, 0], U = [ln 2, 1]: o = [2·0.5 + 0.1·ln 2, 0 + 0.1·1] = [1.069315, 0.1]
    o = ctrl_u_objective(torch.tensor([2.0, 0.0]), torch.tensor([math.log(2.0), 1.0]), 0.1)
    assert_close(o, torch.tensor([1.069315, 0.1]), atol=1e-6, rtol=0)


# -- the plugin through the core --------------------------------------------------------------
def _core_loss(module, hooks, batch, loss_fn):
    """The loss HookedModule.training_step builds (steps 2-7), for the given plugin set."""
    outputs = module.outputs(batch)
    base = loss_fn(outputs)
    objectives = hooks.objectives(module, batch, outputs, base)
    weights = hooks.sample_weights(sum(objectives.values()), batch, outputs, module)
    return hooks.total(hooks.reduce(objectives, weights)), outputs


def _grads(module, loss):
    return torch.cat(
        [
            g.reshape(-1)
            for g in torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)
        ]
    )


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_core_gradient_is_the_official_objective_times_one_over_mean_weight(task):
    # The core computes Σ_i (ℓ_i w_i + c U_i) / Σ_j w_j with Σ w detached: the gradient of the
    # official mean(ℓ·exp(−U)) + c·mean(U), U not detached, times B / Σ w.
    torch.manual_seed(0)
    n_out = 3 if task == "classification" else 1
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, n_out))
    module = TaskModule(net if task == "classification" else _Squeeze(net), task, n_out)
    g = torch.Generator().manual_seed(1)
    batch = {"input": torch.randn(6, 4, generator=g)}
    batch["target"] = (
        torch.randint(3, (6,), generator=g)
        if task == "classification"
        else torch.randn(6, generator=g)
    )
    p = plugin(u_scale=0.7, input_noise=0.5)
    hooks = Hooks([p], seed=3)
    hooks.begin_step(step=4)
    loss, outputs = _core_loss(module, hooks, batch, lambda out: module.losses(batch, out))
    got = _grads(module, loss)

    # the same step by hand: second view x + σ ε with ε from the step generator
    eps = torch.randn((6, 4), generator=step_generator(3, 4, "ctrl-u"))
    out1 = module.outputs(batch)
    out2 = module.outputs({**batch, "input": batch["input"] + 0.5 * eps})
    ell = module.losses(batch, out1)
    if task == "classification":
        u, c = kl_uncertainty(out1["logits"], out2["logits"], 0.7), 1.0
    else:
        u, c = l1_uncertainty(out1["prediction"], out2["prediction"]), 0.7
    official = (ell * torch.exp(-u)).mean() + c * u.mean()
    scale = 6 / torch.exp(-u).sum().detach()
    assert_close(got, _grads(module, official) * scale, atol=1e-6, rtol=1e-5)
    # U is not detached: detaching it would change the gradient
    detached = (ell * torch.exp(-u.detach())).mean() + c * u.detach().mean()
    assert not torch.allclose(got, _grads(module, detached) * scale, atol=1e-5)
    # logged values: mean U and mean w over the (global) batch
    assert_close(hooks.ctx.logged["ctrl-u/uncertainty"], u.mean().detach())
    assert_close(hooks.ctx.logged["ctrl-u/mean_weight"], torch.exp(-u).mean().detach())


class _Squeeze(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def test_second_view_noise_is_the_step_generators_and_changes_each_step():
    p = plugin(input_noise=0.5)
    batch = {"input": torch.zeros(3, 2)}
    a = p._second_view(batch, StepContext(seed=1, step=7))["input"]
    b = p._second_view(batch, StepContext(seed=1, step=7))["input"]
    c = p._second_view(batch, StepContext(seed=1, step=8))["input"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_close(a, 0.5 * torch.randn((3, 2), generator=step_generator(1, 7, "ctrl-u")))
    assert plugin()._second_view(batch, StepContext())["input"] is batch["input"]


def test_dropout_makes_the_two_passes_differ_without_input_noise():
    torch.manual_seed(0)
    module = HookedModule(
        torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3))
    )
    batch = {"input": torch.randn(5, 4), "target": torch.zeros(5, dtype=torch.long)}
    hooks = Hooks([plugin(u_scale=1.0)], seed=0)
    hooks.begin_step(0)
    _core_loss(
        module,
        hooks,
        batch,
        lambda out: F.cross_entropy(out["logits"], batch["target"], reduction="none"),
    )
    assert float(hooks.ctx.logged["ctrl-u/uncertainty"]) > 0
    assert float(hooks.ctx.logged["ctrl-u/mean_weight"]) < 1


def test_identical_passes_warn_once_and_give_weight_one():
    module = HookedModule(torch.nn.Linear(4, 3))
    batch = {"input": torch.randn(5, 4), "target": torch.zeros(5, dtype=torch.long)}
    hooks = Hooks([plugin()], seed=0)
    ce = lambda out: F.cross_entropy(out["logits"], batch["target"], reduction="none")  # noqa: E731
    with pytest.warns(UserWarning, match="ctrl-u: the two forward passes agree exactly"):
        _core_loss(module, hooks, batch, ce)
    # KL of identical logits is 0 up to rounding (log∘softmax vs log_softmax)
    assert_close(float(hooks.ctx.logged["ctrl-u/mean_weight"]), 1.0, atol=1e-6, rtol=0)


def test_weights_without_the_objective_hook_warn_that_the_penalty_is_missing():
    module = HookedModule(torch.nn.Linear(4, 3))
    batch = {"input": torch.randn(5, 4)}
    p = plugin(input_noise=0.1)
    with pytest.warns(UserWarning, match="ctrl-u: objective_terms did not run"):
        w = p.weighting_sample_weights(
            torch.ones(5), batch, module.outputs(batch), module, StepContext()
        )
    assert w.shape == (5,) and bool((w > 0).all() & (w <= 1).all())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_or_predictions_raise_naming_the_plugin(bad):
    module = HookedModule(torch.nn.Linear(4, 3))
    batch = {"input": torch.randn(3, 4)}
    outputs = module.outputs(batch)
    with pytest.raises(ValueError, match="ctrl-u.*losses"):
        plugin(input_noise=0.1).weighting_sample_weights(
            torch.tensor([1.0, bad, 0.0]), batch, outputs, module, StepContext()
        )
    batch["input"][1, 0] = bad
    with pytest.raises(ValueError, match="ctrl-u.*not finite"):
        plugin(input_noise=0.1).objective_terms(module, batch, module.outputs(batch), StepContext())


def test_zero_and_equal_losses_give_the_same_finite_weights():
    torch.manual_seed(0)
    module = HookedModule(torch.nn.Linear(4, 3))
    batch = {"input": torch.randn(4, 4)}
    ws = []
    for losses in (torch.zeros(4), torch.full((4,), 2.3)):
        outputs = module.outputs(batch)
        p = plugin(input_noise=0.3)
        p.objective_terms(module, batch, outputs, StepContext(step=2))
        ws.append(p.weighting_sample_weights(losses, batch, outputs, module, StepContext(step=2)))
    assert_close(ws[0], ws[1])
    assert bool(torch.isfinite(ws[0]).all() & (ws[0] > 0).all())


def test_outputs_without_logits_or_prediction_are_refused():
    with pytest.raises(ValueError, match=r"ctrl-u.*\['logits', 'prediction'\].*\['scores'\]"):
        plugin()._key({"scores": torch.zeros(2)})


def test_divergence_can_be_forced():
    assert plugin(divergence="l1")._key({"logits": torch.zeros(1)}) == ("logits", "l1")
    assert plugin()._key({"logits": torch.zeros(1)}) == ("logits", "kl")
    assert plugin()._key({"prediction": torch.zeros(1)}) == ("prediction", "l1")
    assert plugin().penalty_scale("kl") == 1.0 and plugin(u_scale=0.3).penalty_scale("l1") == 0.3


def test_plugin_metadata_and_entry_point():
    assert CtrlU.family == "sample-weighting" and CtrlU.extra_families == ("objective",)
    assert CtrlU.paper.missing() == [] and CtrlU.paper.arxiv == "2410.11236"
    assert "ctrlu-reward.py" in CtrlU.paper.checked_against
    assert plugin().state_dict() == {}
    (ep,) = [
        ep for ep in importlib.metadata.entry_points(group="paperhooks") if ep.name == "ctrl-u"
    ]
    assert ep.load() is CtrlU


# -- config ----------------------------------------------------------------------------------
def test_config_defaults_are_the_official_ones():
    cfg = CtrlUConfig()
    assert (cfg.u_scale, cfg.divergence, cfg.input_noise) == (0.1, "auto", 0.0)


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"u_scale": -0.1}, "u_scale", ">= 0"),
        ({"u_scale": math.nan}, "u_scale", ">= 0"),
        ({"u_scale": "1"}, "u_scale", ">= 0"),
        ({"u_scale": True}, "u_scale", ">= 0"),
        ({"input_noise": -1.0}, "input_noise", ">= 0"),
        ({"input_noise": math.inf}, "input_noise", ">= 0"),
        ({"divergence": "js"}, "divergence", "auto, kl, l1"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field, allowed):
    with pytest.raises(ValueError, match=f"CtrlUConfig.{field}.*{allowed}"):
        CtrlUConfig(**kwargs)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["ctrl-u"]
    assert recipe.data.name == "digits-ambiguous"


# -- the dataset -----------------------------------------------------------------------------
def test_ambiguous_labels_by_hand():
    # 1-d; class 0 at {0, 4}, class 1 at {10, 6}: centroids 2 and 8
    # margins (distance to the other centroid − to the own one): x=0: 8−2 = 6, x=4: 4−2 = 2,
    # x=10: 8−2 = 6, x=6: 4−2 = 2. rate 0.5 → the two lowest (x=4, x=6) swap classes.
    x = torch.tensor([[0.0], [4.0], [10.0], [6.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert ambiguous_labels(x, y, 0.5, 2).tolist() == [0, 1, 1, 0]
    assert ambiguous_labels(x, y, 0.0, 2).tolist() == [0, 0, 1, 1]


def test_digits_ambiguous_flips_the_asked_fraction_and_keeps_clean_labels():
    assert "digits-ambiguous" in DATASETS
    dm = build_datamodule("digits-ambiguous", {"ambiguous_rate": 0.3}, 0)
    t = dm.train_set.tensors
    flipped = t["target"] != t["clean_target"]
    assert abs(flipped.float().mean().item() - 0.3) < 0.002
    with pytest.raises(ValueError, match="label_noise.kind"):
        build_datamodule("digits-ambiguous", {"label_noise": {"kind": "symmetric", "rate": 0.2}}, 0)
