"""Weight Compander: hand-derived values, merge, the conformance kit, FSDP2, and the effect."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from paperhooks.recipe import load as load_recipe
from paperhooks.reparam import merge, trainable_parameters
from paperhooks.testing import load_checkpoint
from paperhooks.testing.conformance import (
    PluginConformance,
    check_ddp_equals_single,
    check_few_steps,
)
from paperhooks_weight_compander import (
    Compander,
    CompanderAdam,
    WeightCompander,
    WeightCompanderConfig,
    compand,
    compand_slope,
    decay_term,
    expand,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "weight-compander.yaml"


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, reparameterization and objective properties,
    a few steps, bit-identical resume, 2 DDP processes equal 1 (slow). The kit's MLP has two
    Linear layers; both are companded (the paper does not skip the head)."""

    name = "weight-compander"
    plugin_config = {"weight_decay": 5e-4}


class _Module:
    """What the hooks read of a HookedModule."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def _setup(model: nn.Module, **config) -> WeightCompander:
    plugin = WeightCompander(WeightCompanderConfig(**config))
    plugin.reparam_setup(module=_Module(model), ctx=None)
    return plugin


# -- the equations, by hand -------------------------------------------------------------------
def test_compander_values_by_hand():
    # a = 0.8, b = 0.5 (Table I, ResNet34 / CIFAR-10):
    #   Ψ(0.5) = 0.8·arctan(1) = 0.8·π/4 = 0.628319;  Ψ(0) = 0;  Ψ(−0.5) = −0.628319
    #   Ψ'(v) = a / (b(1 + v²/b²)):  Ψ'(0) = 0.8/0.5 = 1.6,  Ψ'(0.5) = 1.6/2 = 0.8
    #   bound aπ/2 = 1.256637;  Ψ⁻¹(0.1) = 0.5·tan(0.125) = 0.062828
    v = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    assert_close(
        compand(v, 0.8, 0.5),
        torch.tensor([0.628319, 0.0, -0.628319], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    assert_close(compand_slope(v, 0.8, 0.5), torch.tensor([0.8, 1.6, 0.8], dtype=torch.float64))
    assert_close(
        expand(torch.tensor([0.1], dtype=torch.float64), 0.8, 0.5),
        torch.tensor([0.062828], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    huge = compand(torch.tensor([1e9, -1e9], dtype=torch.float64), 0.8, 0.5)
    assert_close(huge, torch.tensor([1.256637, -1.256637], dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool((huge.abs() < 0.8 * math.pi / 2).all())


def test_gradient_is_eq3_by_autograd_and_finite_differences():
    # ∂L/∂v = ∂L/∂w · a/(b(1 + v²/b²)) (Eq. 2-3); for L = Σ c·Ψ(v) that is c·Ψ'(v).
    v = torch.tensor([-1.3, -0.2, 0.0, 0.4, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    (g,) = torch.autograd.grad((c * Compander(0.8, 0.5)(v)).sum(), v)
    assert_close(g, c * compand_slope(v.detach(), 0.8, 0.5))
    assert torch.autograd.gradcheck(lambda x: Compander(0.8, 0.5)(x), (v,))


def test_learnable_a_and_b_get_their_derivatives():
    # ∂Ψ/∂a = arctan(v/b);  ∂Ψ/∂b = −a·v/(b² + v²). At a = 0.5, b = 1, v = [1, −2]:
    #   Σ∂Ψ/∂a = arctan(1) + arctan(−2) = 0.785398 − 1.107149 = −0.321751
    #   Σ∂Ψ/∂b = −0.5·1/2 − 0.5·(−2)/5 = −0.25 + 0.2 = −0.05
    c = Compander(0.5, 1.0, learnable=True).double()
    c(torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
    assert_close(c.a.grad, torch.tensor([-0.321751], dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(c.b.grad, torch.tensor([-0.05], dtype=torch.float64))


def test_expand_refuses_weights_outside_the_range():
    with pytest.raises(ValueError, match=r"outside Ψ's range"):
        expand(torch.tensor([0.0, 0.8]), 0.5, 1.0)  # 0.8 ≥ 0.5·π/2 = 0.785


def test_decay_acts_on_w_in_the_fixed_version_and_on_v_in_the_learnable_one():
    # fixed: (λ/2)‖Ψ(v)‖², gradient λ·Ψ(v)·Ψ'(v); v = 0.5 (a = 0.8, b = 0.5), λ = 0.1:
    #   term = 0.05·0.628319² = 0.019739;  gradient = 0.1·0.628319·0.8 = 0.050265
    v = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    term = decay_term([v], [Compander(0.8, 0.5)], 0.1)
    assert_close(term, torch.tensor(0.019739, dtype=torch.float64), atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(term, v)
    assert_close(g, torch.tensor([0.050265], dtype=torch.float64), atol=1e-6, rtol=0)
    # learnable: (λ/2)‖v‖², gradient λ·v = 0.05, and nothing for a or b
    c = Compander(0.5, 1.0, learnable=True).double()
    term = decay_term([v], [c], 0.1)
    assert_close(term, torch.tensor(0.0125, dtype=torch.float64))
    term.backward()
    assert_close(v.grad, torch.tensor([0.05], dtype=torch.float64))
    assert c.a.grad is None and c.b.grad is None


def test_companderadam_takes_the_adam_step_of_w_times_the_slope():
    # First Adam step: m̂ = g, ŝ = g², so the step is lr·g/(|g| + ε) ≈ lr·sign(g), taken on
    # g_w = g_v/Ψ'(v) and multiplied by Ψ'(v). v = [0, 0.5] (Ψ' = 1.6, 0.8), g_v = [0.32, −0.4]:
    #   Δv = −0.01·[+1·1.6, −1·0.8] = [−0.016, +0.008]. A plain tensor gets torch's Adam step.
    v = nn.Parameter(torch.tensor([0.0, 0.5], dtype=torch.float64))
    u = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    u_ref = nn.Parameter(u.detach().clone())
    opt = CompanderAdam([v, u], companded=[(v, 0.8, 0.5)], lr=0.01, eps=0.0)
    ref = torch.optim.Adam([u_ref], lr=0.01, eps=0.0)
    v.grad = torch.tensor([0.32, -0.4], dtype=torch.float64)
    u.grad = u_ref.grad = torch.tensor([0.3, 0.7], dtype=torch.float64)
    opt.step()
    ref.step()
    assert_close(v.detach(), torch.tensor([-0.016, 0.508], dtype=torch.float64))
    assert_close(u.detach(), u_ref.detach())


# -- the plugin on a model ---------------------------------------------------------------------
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("learnable", [False, True])
def test_registering_keeps_the_function_and_merge_gives_a_plain_equal_model(learnable):
    model, x = _mlp(), torch.randn(4, 5)
    before = model(x).detach()
    _setup(model, learnable=learnable)
    assert all(
        parametrize.is_parametrized(m, "weight") for m in (model[0], model[2])
    )  # head included
    assert_close(model(x), before)  # v₀ = Ψ⁻¹(w₀) (Eq. 4)
    with torch.no_grad():  # move v and (learnable) a, b away from their initial values
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained = model(x).detach()
    merged = merge(model)
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert sorted(n for n, _ in merged.named_parameters()) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
    ]
    assert_close(merged(x), trained)


def test_a_model_copied_between_forward_and_objective_still_copies():
    # the (v, w) kept for the decay term hold graph tensors, which deepcopy refuses
    import copy

    model = _mlp()
    _setup(model, learnable=True)
    model(torch.randn(2, 5))
    twin = copy.deepcopy(model)
    assert all(c._seen is None for c in twin.modules() if isinstance(c, Compander))
    assert_close(twin(torch.ones(1, 5)), model(torch.ones(1, 5)))


def test_trainable_parameters_count_a_and_b_in_the_learnable_version_only():
    # the MLP has 5·7 + 7 + 7·3 + 3 = 66 parameters; learnable adds a and b per layer: 70
    assert trainable_parameters(_mlp()) == 66
    fixed, learn = _mlp(), _mlp()
    _setup(fixed)
    _setup(learn, learnable=True)
    assert trainable_parameters(fixed) == 66 and trainable_parameters(learn) == 70


def test_objective_term_is_eq5_on_the_forward_weights():
    model, x = _mlp(), torch.randn(4, 5)
    plugin = _setup(model, weight_decay=0.2)
    model(x)  # the training forward the term reads
    terms = plugin.objective_terms(
        module=_Module(model), batch={"input": x, "target": torch.zeros(4)}, outputs={}, ctx=None
    )
    expected = 0.1 * (model[0].weight.square().sum() + model[2].weight.square().sum())
    assert terms["weight_decay"].shape == (4,)
    assert_close(terms["weight_decay"], expected.expand(4))
    # without a forward (nothing seen) the term is recomputed from the parametrizations
    again = plugin.objective_terms(
        module=_Module(model), batch={"input": x, "target": torch.zeros(4)}, outputs={}, ctx=None
    )
    assert_close(again["weight_decay"], expected.expand(4))
    assert (
        plugin.objective_terms(
            module=_Module(_mlp()), batch={"target": torch.zeros(4)}, outputs={}, ctx=None
        )
        is not None
    )
    assert (
        WeightCompander(WeightCompanderConfig(weight_decay=0.0)).objective_terms(
            module=_Module(model), batch={"target": torch.zeros(4)}, outputs={}, ctx=None
        )
        is None
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"a": 0.0}, "a"),
        ({"b": -1.0}, "b"),
        ({"init_a": float("nan")}, "init_a"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"WeightCompanderConfig.{field}"):
        WeightCompanderConfig(**kwargs)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["weight-compander"]


def test_checkpoint_keys_are_stable_and_load_with_weights_only(tmp_path):
    metrics = check_few_steps("weight-compander", {"learnable": True}, tmp_path)
    assert "train/weight_decay" in metrics and "compander/mean_a" in metrics
    ckpt = load_checkpoint(tmp_path / "runs" / "few-steps" / "version_0")
    assert sorted(ckpt["state_dict"]) == [
        "model.1.bias",
        "model.1.parametrizations.weight.0.a",
        "model.1.parametrizations.weight.0.b",
        "model.1.parametrizations.weight.original",
        "model.4.bias",
        "model.4.parametrizations.weight.0.a",
        "model.4.parametrizations.weight.0.b",
        "model.4.parametrizations.weight.original",
    ]
    assert ckpt["paperhooks"]["plugins"] == [{"name": "weight-compander", "state": {}}]


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process(tmp_path):
    # learnable: a, b are parameters FSDP2 shards like any other (shape [1])
    check_ddp_equals_single(
        "weight-compander", {"learnable": True, "weight_decay": 5e-4}, tmp_path, strategy="fsdp2"
    )
