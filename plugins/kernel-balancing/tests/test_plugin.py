"""The plugin: config, metadata, the fit on the observed set, the hook, state."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.context import StepContext
from paperhooks.tasks import build_datamodule
from paperhooks.testing.conformance import check_entry_point, check_metadata, check_recipe_roundtrip
from paperhooks_kernel_balancing import KernelBalancing, KernelBalancingConfig

ROOT = Path(__file__).resolve().parents[3]


def fitted(weights: list[float], **config) -> KernelBalancing:
    """A plugin whose weights are set by hand (as after a fit)."""
    plugin = KernelBalancing(KernelBalancingConfig(**config))
    plugin.weights = torch.tensor(weights)
    return plugin


def call(plugin, losses, batch, step=5):
    ctx = StepContext(step=step)
    return plugin.weighting_sample_weights(losses=losses, batch=batch, module=None, ctx=ctx), ctx


def observed_set(seed=0, **data):
    dm = build_datamodule("synthetic-recsys", data or None, seed=seed)
    t = dm.train_set.tensors
    return dm, t["input"], t["target"], dm.info.num_users, dm.info.num_items


# -- config and metadata ----------------------------------------------------------------------
def test_config_defaults():
    cfg = KernelBalancingConfig()
    assert (cfg.gamma, cfg.tolerance, cfg.num_centers, cfg.kernel, cfg.bandwidth, cfg.hinge) == (
        10.0,
        1e-3,
        64,
        "gaussian",
        0.1,
        "each",
    )
    assert (cfg.fit_steps, cfg.fit_lr, cfg.center_pool, cfg.feature_dim, cfg.feature_steps) == (
        300,
        0.05,
        2048,
        4,
        300,
    )
    assert cfg.inverse_propensity is False


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": math.nan}, "gamma"),
        ({"tolerance": -1e-3}, "tolerance"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"fit_lr": 0}, "fit_lr"),
        ({"num_centers": 0}, "num_centers"),
        ({"fit_steps": 1.5}, "fit_steps"),
        ({"center_pool": 0}, "center_pool"),
        ({"feature_dim": True}, "feature_dim"),
        ({"feature_steps": -1}, "feature_steps"),
        ({"kernel": "laplace"}, "kernel"),
        ({"hinge": "max"}, "hinge"),
        ({"inverse_propensity": 1}, "inverse_propensity"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"KernelBalancingConfig.{field}"):
        KernelBalancingConfig(**kwargs)


def test_metadata_entry_point_and_recipe_round_trip_pass_the_conformance_kit(fast):
    cls = check_entry_point("kernel-balancing")
    assert cls is KernelBalancing
    check_metadata(cls, "kernel-balancing")
    config = check_recipe_roundtrip(
        "kernel-balancing", {**fast, "kernel": "exponential", "hinge": "sum"}
    )
    assert config == KernelBalancingConfig(**fast, kernel="exponential", hinge="sum")
    assert KernelBalancing.paper.verified is False  # the paper's own text was not available
    assert "matrix_factorization_coat.py" in KernelBalancing.paper.checked_against


def test_the_example_recipe_and_the_method_card_snippet_validate():
    R.load(ROOT / "recipes" / "kernel-balancing.yaml")
    card = (ROOT / "plugins" / "kernel-balancing" / "README.md").read_text()
    (snippet,) = re.findall(r"## Recipe\n\n```yaml\n(.*?)```", card, re.S)
    raw = yaml.safe_load(snippet)
    raw.setdefault("trainer", {"max_steps": 1})
    R.validate(raw)


# -- the fit ------------------------------------------------------------------------------------
def test_fit_balances_the_observed_set_and_is_deterministic(fast):
    _, pairs, ratings, u, i = observed_set()
    a, b = (
        KernelBalancing(KernelBalancingConfig(**fast)),
        KernelBalancing(KernelBalancingConfig(**fast)),
    )
    w = a.fit(pairs, ratings, u, i, seed=7)
    assert w.shape == (pairs.shape[0],) and w.dtype == torch.float32
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all())
    assert abs(w.mean().item() - 1) < 1e-5
    assert torch.equal(w, b.fit(pairs, ratings, u, i, seed=7))
    assert not torch.equal(w, b.fit(pairs, ratings, u, i, seed=8))
    d = a.diagnostics
    assert d["imbalance_after"] < d["imbalance_before"] / 3, d
    assert 0 < d["ess_fraction"] < 1


def test_default_fit_upweights_the_under_observed_pairs():
    _, pairs, ratings, u, i = observed_set()
    dm = build_datamodule("synthetic-recsys", None, seed=0)
    p = dm.train_set.tensors["propensity"]
    plugin = KernelBalancing()
    w = plugin.fit(pairs, ratings, u, i, seed=0)
    # measured: correlation with the true 1/p 0.56, imbalance 0.016 → 0.0008
    assert torch.corrcoef(torch.stack([w, 1 / p]))[0, 1] > 0.4
    assert plugin.diagnostics["imbalance_after"] < plugin.diagnostics["imbalance_before"] / 5


def test_gamma_zero_is_uniform_and_with_inverse_propensity_is_ips():
    _, pairs, ratings, u, i = observed_set()
    plugin = KernelBalancing(KernelBalancingConfig(gamma=0.0, inverse_propensity=True))
    assert torch.equal(plugin.fit(pairs, ratings, u, i), torch.ones(pairs.shape[0]))
    batch = {"index": torch.tensor([0, 1]), "propensity": torch.tensor([0.5, 0.25])}
    w, _ = call(plugin, torch.ones(2), batch)
    assert_close(w, torch.tensor([2.0, 4.0]))  # 1/p


# -- the hook -------------------------------------------------------------------------------------
def test_hook_returns_the_weights_of_the_batch_rows_and_logs_the_global_ess():
    plugin = fitted([1.0, 2.0, 3.0, 4.0])
    w, ctx = call(plugin, torch.rand(2), {"index": torch.tensor([3, 0])})
    assert_close(w, torch.tensor([4.0, 1.0]))
    # (4 + 1)² / (16 + 1) / 2 = 25/34 = 0.735294
    assert ctx.logged["kernel-balancing/batch_ess_fraction"] == pytest.approx(25 / 34)


def test_inverse_propensity_divides_by_the_batch_propensity():
    plugin = fitted([1.0, 2.0], inverse_propensity=True)
    w, _ = call(
        plugin,
        torch.rand(2),
        {"index": torch.tensor([0, 1]), "propensity": torch.tensor([0.5, 0.25])},
    )
    assert_close(w, torch.tensor([2.0, 8.0]))  # [1/0.5, 2/0.25]
    with pytest.raises(ValueError, match="kernel-balancing.*propensity"):
        call(plugin, torch.rand(2), {"index": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="kernel-balancing.*propensit"):
        call(
            plugin,
            torch.rand(2),
            {"index": torch.tensor([0, 1]), "propensity": torch.tensor([0.0, 0.5])},
        )


@pytest.mark.parametrize(
    "losses",
    [torch.rand(4) * 3, torch.rand(4) * 1e4, torch.zeros(4), torch.full((4,), 2.3)],
    ids=["random", "spread over 1e4", "all zero", "all equal"],
)
def test_weights_are_finite_positive_and_do_not_depend_on_the_losses(losses):
    plugin = fitted([0.5, 1.5, 1.0, 1.0])
    given = losses.clone()
    w, _ = call(plugin, given, {"index": torch.arange(4)})
    assert torch.equal(given, losses)
    assert_close(w, torch.tensor([0.5, 1.5, 1.0, 1.0]))


def test_a_batch_of_one_sample():
    w, ctx = call(fitted([0.5, 1.5]), torch.tensor([0.7]), {"index": torch.tensor([1])})
    assert_close(w, torch.tensor([1.5]))
    assert ctx.logged["kernel-balancing/batch_ess_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_raise_naming_the_plugin(bad):
    with pytest.raises(ValueError, match="kernel-balancing.*NaN or inf"):
        call(fitted([1.0, 1.0]), torch.tensor([1.0, bad]), {"index": torch.arange(2)})


def test_bad_batches_raise_naming_the_plugin():
    plugin = fitted([1.0, 1.0])
    with pytest.raises(ValueError, match="kernel-balancing.*'index'"):
        call(plugin, torch.ones(2), {"input": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="kernel-balancing.*out of range"):
        call(plugin, torch.ones(1), {"index": torch.tensor([2])})


def test_hook_without_weights_or_data_explains_what_to_do():
    plugin = KernelBalancing()
    with pytest.raises(ValueError, match=r"kernel-balancing.*KernelBalancing\.fit"):
        call(plugin, torch.ones(2), {"index": torch.arange(2)})


def test_setup_reads_the_trainers_data_and_the_first_step_fits_from_it(fast):
    dm, pairs, ratings, u, i = observed_set()
    module = SimpleNamespace(trainer=SimpleNamespace(datamodule=dm))
    plugin = KernelBalancing(KernelBalancingConfig(**fast))
    plugin.lifecycle_setup(module=module, ctx=StepContext(seed=11))
    assert plugin.weights is None  # the fit waits for the first weighted step
    ctx = StepContext(seed=11, step=0)
    w = plugin.weighting_sample_weights(
        losses=torch.ones(3), batch={"index": torch.tensor([5, 0, 2])}, module=module, ctx=ctx
    )
    expected = KernelBalancing(KernelBalancingConfig(**fast)).fit(pairs, ratings, u, i, seed=11)
    assert torch.equal(plugin.weights, expected)
    assert torch.equal(w, expected[[5, 0, 2]])
    assert {
        "kernel-balancing/imbalance_before",
        "kernel-balancing/imbalance_after",
        "kernel-balancing/ess_fraction",
    } <= set(ctx.logged)


def test_setup_refuses_data_that_is_not_user_item_pairs():
    digits = build_datamodule("digits", None, seed=0)
    module = SimpleNamespace(trainer=SimpleNamespace(datamodule=digits))
    with pytest.raises(ValueError, match="kernel-balancing.*num_users and num_items"):
        KernelBalancing().lifecycle_setup(module=module, ctx=StepContext())


# -- state --------------------------------------------------------------------------------------
def test_state_round_trip_restores_the_weights_without_refitting(fast):
    _, pairs, ratings, u, i = observed_set()
    a = KernelBalancing(KernelBalancingConfig(**fast))
    assert a.state_dict() == {}
    a.fit(pairs, ratings, u, i, seed=0)
    state = a.state_dict()
    assert set(state) == {"weights", "imbalance_before", "imbalance_after", "ess_fraction"}
    b = KernelBalancing(KernelBalancingConfig(**fast))
    b.load_state_dict(state)
    w, _ = call(
        b, torch.ones(3), {"index": torch.tensor([0, 4, 9])}
    )  # no module: no refit possible
    assert torch.equal(w, a.weights[[0, 4, 9]])
    assert b.diagnostics == a.diagnostics
    b.load_state_dict({})  # a checkpoint saved before the first step
    assert torch.equal(b.weights, a.weights)
