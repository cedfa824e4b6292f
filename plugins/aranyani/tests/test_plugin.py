"""The plugin: config, metadata, the hooks on hand-derived and official-formula examples, state."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as Fn
import yaml
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.gradients import Block, GradientSet
from paperhooks.module import HookedModule
from paperhooks.testing.conformance import (
    check_entry_point,
    check_family,
    check_metadata,
    check_recipe_roundtrip,
)
from paperhooks.testing.families import FAMILY_CHECKS, context
from paperhooks_aranyani import Aranyani, AranyaniConfig, ObliqueForest

ROOT = Path(__file__).resolve().parents[3]


def make(forest: torch.nn.Module, **config) -> tuple[HookedModule, Aranyani]:
    plugin = Aranyani(AranyaniConfig(**config))
    plugin.name = "aranyani"
    return HookedModule(forest, [plugin]), plugin


def train_step(module: HookedModule, batch: dict[str, torch.Tensor], step: int = 0):
    """Steps 2–7' of ``HookedModule.training_step`` (no optimizer): writes ``p.grad``."""
    hooks = module.hooks
    hooks.begin_step(step)
    outputs = module.outputs(batch)
    objectives = hooks.objectives(module, batch, outputs, module.losses(batch, outputs))
    reduced = hooks.reduce(objectives, None)
    return hooks.surgery_gradients(reduced, module), reduced


def task_gradient(forest: ObliqueForest, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    loss = Fn.cross_entropy(forest(batch["input"]), batch["target"])
    return list(torch.autograd.grad(loss, [forest.W, forest.B, forest.theta]))


def fairness_part(forest: ObliqueForest, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """p.grad − the task gradient, for W, B, θ (after a step has written p.grad)."""
    task = task_gradient(forest, batch)
    return [p.grad - g for p, g in zip((forest.W, forest.B, forest.theta), task, strict=True)]


def depth1(w: float, b: float) -> ObliqueForest:
    forest = ObliqueForest(1, 2, depth=1, trees=1).double()
    with torch.no_grad():
        forest.W.fill_(w)
        forest.B.fill_(b)
    return forest


def sigma(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def dsigma(z: float) -> float:
    return sigma(z) * (1 - sigma(z))


# -- config and metadata ----------------------------------------------------------------------------
def test_config_defaults_are_the_official_ones():
    cfg = AranyaniConfig()
    assert (cfg.lambda_const, cfg.delta, cfg.gradient_type, cfg.gamma) == (
        0.3,
        0.01,
        "vanilla",
        0.9,
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lambda_const": -0.1}, "lambda_const"),
        ({"lambda_const": math.inf}, "lambda_const"),
        ({"lambda_const": True}, "lambda_const"),
        ({"delta": 0.0}, "delta"),
        ({"delta": math.nan}, "delta"),
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": 0}, "gamma"),
        ({"gradient_type": "adam"}, "gradient_type"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AranyaniConfig.{field}"):
        AranyaniConfig(**kwargs)


def test_entry_point_metadata_and_recipe_round_trip_pass_the_conformance_kit():
    cls = check_entry_point("aranyani")
    assert cls is Aranyani
    check_metadata(cls, "aranyani")
    config = check_recipe_roundtrip(
        "aranyani", {"lambda_const": 1.0, "gradient_type": "ema", "gamma": 0.8}
    )
    assert config == AranyaniConfig(lambda_const=1.0, gradient_type="ema", gamma=0.8)
    assert Aranyani.paper.verified
    assert "src/aranyani.py" in Aranyani.paper.checked_against
    assert "af2cf3f325ff775fc4800adf25252687395b5db5" in Aranyani.paper.checked_against
    assert Aranyani.strategies["fsdp2"] == "unsupported" and not Aranyani.columns_ok


def test_family_checks_surgery_holds_and_the_generic_objective_check_is_refused_clearly():
    # gradient surgery: on sets without this plugin's objectives the hook abstains (plain sum)
    FAMILY_CHECKS["gradient-surgery"](Aranyani())
    # the kit's objective check runs an MLP without decision nodes on a batch without 'group':
    # the fairness gradient is undefined there, and the plugin says so instead of abstaining
    with pytest.raises(ValueError, match="aranyani: the model has no soft oblique decision forest"):
        check_family("aranyani")


def test_objective_terms_have_the_objective_familys_properties_on_a_forest():
    torch.manual_seed(0)
    module, plugin = make(ObliqueForest(4, 2))
    batch = {
        "input": torch.randn(6, 4),
        "target": torch.randint(2, (6,)),
        "group": torch.tensor([0, 1, 1, 0, 1, 1]),
    }
    terms = plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=context()
    )
    assert sorted(terms) == ["nodes_g0", "nodes_g1"]
    for v in terms.values():
        assert v.shape == (6,) and bool(torch.isfinite(v).all()) and v.requires_grad
    # group 0 rows only in nodes_g0, scaled by B/N_0 = 6/2: its mean is E_0[Σ_{t,i} n]
    n = module.model.node_decisions(batch["input"]).sum(dim=(0, 2)).detach()
    assert_close(terms["nodes_g0"].detach(), n * torch.tensor([3.0, 0, 0, 3.0, 0, 0]))
    assert_close(terms["nodes_g0"].mean().detach(), n[[0, 3]].mean())
    assert_close(terms["nodes_g1"].mean().detach(), n[[1, 2, 4, 5]].mean())


def test_the_example_recipe_and_the_method_card_snippet_validate():
    R.load(ROOT / "recipes" / "aranyani.yaml")
    card = (ROOT / "plugins" / "aranyani" / "README.md").read_text()
    (snippet,) = re.findall(r"## Recipe\n\n```yaml\n(.*?)```", card, re.S)
    R.validate(yaml.safe_load(snippet))


# -- the notes' unit check: a depth-1 tree, 1-D input, one sample per group -------------------------
@pytest.mark.parametrize(
    ("w", "b", "x0", "x1", "F", "fair_w", "fair_b"),
    [
        # sign regime: z0 = 0, z1 = 0.5; n0 = 0.5, n1 = σ(0.5) = 0.6224593, F = 0.1224593 ≥ δ → H' = 1
        # ∂n/∂w = σ'(z)·x: E_1 = σ'(0.5)·1 = 0.2350037, E_0 = σ'(0)·0 = 0 → 0.3·0.2350037
        # ∂n/∂b = σ'(z):   E_1 − E_0 = 0.2350037 − 0.25 = −0.0149963 → 0.3·(−0.0149963)
        (0.5, 0.0, 0.0, 1.0, 0.1224593, 0.0705011, -0.0044989),
        # sign regime, F < 0: w = −0.5 → n1 = σ(−0.5) = 0.3775407, F = −0.1224593 → H' = −1
        # E_1[∂n/∂w] = σ'(−0.5)·1 = 0.2350037 → −0.0705011; ∂n/∂b: −0.3·(0.2350037 − 0.25)
        (-0.5, 0.0, 0.0, 1.0, -0.1224593, -0.0705011, 0.0044989),
        # quadratic regime: b = 1, w = 0.004, x0 = −1, x1 = 1: z = 0.996, 1.004
        # F = σ(1.004) − σ(0.996) = 0.0015729 < δ → H' = F
        # E_1 − E_0 for w: σ'(1.004)·1 − σ'(0.996)·(−1) = 0.1962482 + 0.1969751 = 0.3932233
        #   → 0.3 · 0.0015729 · 0.3932233 = 1.85550e-4
        # for b: σ'(1.004) − σ'(0.996) = −0.00072686 → 0.3 · 0.0015729 · (−0.00072686) = −3.4298e-7
        (0.004, 1.0, -1.0, 1.0, 0.0015729, 1.85550e-4, -3.4298e-7),
    ],
    ids=["sign regime", "sign regime, F < 0", "quadratic regime"],
)
def test_depth_1_tree_fairness_gradient_is_the_hand_derived_sigma_prime_x_difference(
    w, b, x0, x1, F, fair_w, fair_b
):
    forest = depth1(w, b)
    module, plugin = make(forest)
    batch = {
        "input": torch.tensor([[x0], [x1]], dtype=torch.float64),
        "target": torch.tensor([0, 1]),
        "group": torch.tensor([0, 1]),
    }
    train_step(module, batch)
    gap = (
        plugin.node_sums[1, 0, 0] / plugin.counts[1] - plugin.node_sums[0, 0, 0] / plugin.counts[0]
    )
    assert gap.item() == pytest.approx(F, abs=1e-7)
    # the same numbers from the closed forms, in full precision
    z0, z1 = w * x0 + b, w * x1 + b
    exact_F = sigma(z1) - sigma(z0)
    h = exact_F if abs(exact_F) < 0.01 else math.copysign(1.0, exact_F - 0.005)
    exact_w = 0.3 * h * (dsigma(z1) * x1 - dsigma(z0) * x0)
    exact_b = 0.3 * h * (dsigma(z1) - dsigma(z0))
    assert exact_w == pytest.approx(fair_w, rel=1e-4) and exact_b == pytest.approx(fair_b, rel=1e-4)
    got_w, got_b, got_theta = fairness_part(forest, batch)
    assert got_w.item() == pytest.approx(exact_w, rel=1e-9, abs=1e-15)
    assert got_b.item() == pytest.approx(exact_b, rel=1e-9, abs=1e-15)
    assert torch.equal(got_theta, torch.zeros_like(got_theta))  # leaves get no fairness gradient


def test_lambda_zero_is_the_task_gradient_and_aggregates_still_count():
    forest = depth1(0.5, 0.0)
    module, plugin = make(forest, lambda_const=0.0)
    batch = {
        "input": torch.tensor([[0.0], [1.0]], dtype=torch.float64),
        "target": torch.tensor([0, 1]),
        "group": torch.tensor([0, 1]),
    }
    train_step(module, batch)
    for part in fairness_part(forest, batch):
        assert part.abs().max().item() < 1e-15
    assert plugin.counts.tolist() == [1.0, 1.0]


def test_one_group_only_gives_no_fairness_gradient_yet():
    forest = depth1(0.5, 0.0)
    module, plugin = make(forest)
    batch = {
        "input": torch.tensor([[0.0], [1.0]], dtype=torch.float64),
        "target": torch.tensor([0, 1]),
        "group": torch.tensor([1, 1]),
    }
    train_step(module, batch)
    for part in fairness_part(forest, batch):
        assert part.abs().max().item() < 1e-15
    assert plugin.counts.tolist() == [0.0, 2.0]


# -- agreement with the official per-sample loop (src/aranyani.py, restated) --------------------------
def official_fairness_gradient(forest, xs, groups, lam=0.3, delta=0.01, kind="vanilla", gamma=0.9):
    """``train_online`` with batch 1 and fixed parameters, restated: after each sample,

    count[a] += 1; agg_y[a] += n(x); grad = ∂Σn(x)/∂θ;
    vanilla: G[a] = G[a]·(1 − 1/count[a]) + grad/count[a];  momentum/ema: G[a] = G[a]·γ + grad
    cf_a = (1 − γ)/(1 − γ^count[a]) for ema, else 1
    F = agg_y[1]/count[1] − agg_y[0]/count[0]; check = |F| < δ
    fair = λ·(check·F + (1 − check)·sign(F − δ/2))·(G[1]·cf_1 − G[0]·cf_0)   (W and B only)
    Returns the last sample's fairness gradients for W and B.
    """
    count = [0, 0]
    agg = [torch.zeros_like(forest.B), torch.zeros_like(forest.B)]
    g_w = [torch.zeros_like(forest.W), torch.zeros_like(forest.W)]
    g_b = [torch.zeros_like(forest.B), torch.zeros_like(forest.B)]
    for x, a in zip(xs, groups.tolist(), strict=True):
        count[a] += 1
        n = forest.node_decisions(x.unsqueeze(0))[:, 0]  # [T, N]
        agg[a] = agg[a] + n.detach()
        dw, db = torch.autograd.grad(n.sum(), [forest.W, forest.B])
        if kind == "vanilla":
            f = 1 / count[a]
            g_w[a], g_b[a] = g_w[a] * (1 - f) + dw * f, g_b[a] * (1 - f) + db * f
        else:
            g_w[a], g_b[a] = g_w[a] * gamma + dw, g_b[a] * gamma + db
    cf = [(1 - gamma) / (1 - gamma ** count[a]) if kind == "ema" else 1.0 for a in (0, 1)]
    F = agg[1] / count[1] - agg[0] / count[0]  # [T, N]
    check = (F.abs() < delta).to(F.dtype)
    h = check * F + (1 - check) * torch.sign(F - delta / 2)
    fair_w = lam * h.unsqueeze(1) * (g_w[1] * cf[1] - g_w[0] * cf[0])
    fair_b = lam * h * (g_b[1] * cf[1] - g_b[0] * cf[0])
    return fair_w, fair_b, F


@pytest.mark.parametrize(
    ("kind", "batch_size"),
    [("vanilla", 4), ("vanilla", 1), ("momentum", 1), ("ema", 1)],
)
def test_aggregates_and_fairness_gradient_agree_with_the_official_per_sample_loop(kind, batch_size):
    torch.manual_seed(3)
    forest = ObliqueForest(3, 2, depth=2, trees=2).double()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(12, 3, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1])
    targets = torch.randint(2, (12,), generator=g)
    module, plugin = make(forest, gradient_type=kind)
    for s in range(12 // batch_size):
        rows = slice(s * batch_size, (s + 1) * batch_size)
        batch = {"input": xs[rows], "target": targets[rows], "group": groups[rows]}
        train_step(module, batch, step=s)  # no optimizer step: the parameters stay fixed
    want_w, want_b, want_F = official_fairness_gradient(forest, xs, groups, kind=kind)
    got_F = plugin.node_sums[1] / plugin.counts[1] - plugin.node_sums[0] / plugin.counts[0]
    assert_close(got_F, want_F, rtol=1e-10, atol=1e-12)
    got_w, got_b, got_theta = fairness_part(forest, batch)
    assert_close(got_w, want_w, rtol=1e-9, atol=1e-12)
    assert_close(got_b, want_b, rtol=1e-9, atol=1e-12)
    assert torch.equal(got_theta, torch.zeros_like(got_theta))
    assert got_w.abs().max() > 1e-3  # the check is not vacuous


def test_ema_with_batches_is_the_decay_averaged_approximation():
    # batch 4 instead of 1: not the official order-dependent value, but the corrected
    # accumulator still averages to within a few percent of it on this example
    torch.manual_seed(3)
    forest = ObliqueForest(3, 2, depth=2, trees=2).double()
    g = torch.Generator().manual_seed(1)
    xs, targets = (
        torch.randn(12, 3, generator=g, dtype=torch.float64),
        torch.randint(2, (12,), generator=g),
    )
    groups = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1])
    module, _ = make(forest, gradient_type="ema")
    for s in range(3):
        rows = slice(4 * s, 4 * s + 4)
        batch = {"input": xs[rows], "target": targets[rows], "group": groups[rows]}
        train_step(module, batch, step=s)
    want_w, _, _ = official_fairness_gradient(forest, xs, groups, kind="ema")
    got_w = fairness_part(forest, batch)[0]
    assert not torch.allclose(got_w, want_w, rtol=1e-6)
    assert (got_w - want_w).norm() < 0.25 * want_w.norm()


# -- errors ----------------------------------------------------------------------------------------
def test_bad_batches_and_models_raise_naming_the_plugin():
    module, plugin = make(ObliqueForest(2, 2))
    x = torch.randn(2, 2)
    ctx = context()
    with pytest.raises(ValueError, match="aranyani.*'group'"):
        plugin.objective_terms(
            module=module,
            batch={"input": x, "target": torch.tensor([0, 1])},
            outputs=module.outputs({"input": x}),
            ctx=ctx,
        )
    with pytest.raises(ValueError, match="aranyani.*0 or 1"):
        plugin.objective_terms(
            module=module,
            batch={"input": x, "target": torch.tensor([0, 1]), "group": torch.tensor([0, 2])},
            outputs=module.outputs({"input": x}),
            ctx=ctx,
        )
    mlp, p2 = make(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="aranyani.*oblique-forest"):
        p2.objective_terms(
            module=mlp,
            batch={"input": x, "target": torch.tensor([0, 1]), "group": torch.tensor([0, 1])},
            outputs=mlp.outputs({"input": x}),
            ctx=ctx,
        )


def test_surgery_that_never_sees_its_objectives_is_an_error_on_the_next_step():
    module, plugin = make(ObliqueForest(2, 2))
    batch = {
        "input": torch.randn(2, 2),
        "target": torch.tensor([0, 1]),
        "group": torch.tensor([0, 1]),
    }
    plugin.objective_terms(module=module, batch=batch, outputs=module.outputs(batch), ctx=context())
    with pytest.raises(RuntimeError, match="aranyani.*first among the surgery plugins"):
        plugin.objective_terms(
            module=module, batch=batch, outputs=module.outputs(batch), ctx=context()
        )
    # a set without nodes_g0/nodes_g1 while terms are pending: a plugin before it dropped them
    plugin.load_state_dict({})
    plugin.objective_terms(module=module, batch=batch, outputs=module.outputs(batch), ctx=context())
    gset = GradientSet(
        torch.ones(1, 4), ["loss"], torch.ones(1), blocks=[Block("model.W", 0, 4, torch.Size([4]))]
    )
    with pytest.raises(ValueError, match="aranyani.*missing from the gradient set"):
        plugin.surgery_combine(grads=gset, ctx=context())


# -- state -------------------------------------------------------------------------------------------
def test_state_round_trip_restores_the_aggregates():
    torch.manual_seed(0)
    forest = ObliqueForest(3, 2, depth=2, trees=2)
    module, plugin = make(forest, gradient_type="ema")
    batch = {
        "input": torch.randn(8, 3),
        "target": torch.randint(2, (8,)),
        "group": torch.tensor([0, 1] * 4),
    }
    train_step(module, batch)
    state = plugin.state_dict()
    assert set(state) == {"counts", "node_sums", "grad_w", "grad_b", "positives", "correct"}
    assert state["grad_w"].shape == (2, 2, 3, 3) and state["counts"].tolist() == [4.0, 4.0]
    other_module, other = make(forest, gradient_type="ema")
    other.load_state_dict(state)
    state["counts"][0] = 99  # the loaded state is a copy
    assert other.counts.tolist() == [4.0, 4.0]
    train_step(module, batch, 1)
    g1 = [p.grad.clone() for p in forest.parameters()]
    train_step(other_module, batch, 1)
    for a, p in zip(g1, forest.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    other.load_state_dict({})  # a checkpoint saved before the first step
    assert other.node_sums.numel() == 0 and other.counts.tolist() == [0.0, 0.0]
