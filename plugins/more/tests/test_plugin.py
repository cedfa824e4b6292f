"""The plugin: config, metadata, the hooks one by one, state, the task, the recipe."""

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
from paperhooks.gradients import GradientSet
from paperhooks.module import HookedModule
from paperhooks.tasks import build_datamodule, build_model
from paperhooks.testing.conformance import (
    check_entry_point,
    check_family,
    check_metadata,
    check_recipe_roundtrip,
)
from paperhooks.testing.families import context
from paperhooks_more import More, MoreConfig, PreferenceCalibrationError, RewardMLP, RewardMLPConfig

ROOT = Path(__file__).resolve().parents[3]


def batch_of(
    margins: list[float], tasks: list[int]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A pair batch whose chosen − rejected reward margins are ``margins``."""
    rewards = torch.stack([torch.tensor(margins), torch.zeros(len(margins))], dim=1)
    rewards.requires_grad_(True)
    batch = {
        "input": torch.zeros(len(margins), 2, 1),
        "target": torch.zeros(len(margins), dtype=torch.int64),
        "task": torch.tensor(tasks),
    }
    return batch, {"logits": rewards}


def gset(rows: list[list[float]], names=("task0", "task1", "task2")) -> GradientSet:
    g = torch.tensor(rows)
    return GradientSet(g, list(names), torch.ones(len(rows), dtype=torch.float64))


# -- config and metadata ----------------------------------------------------------------------
def test_config_defaults_are_the_official_readme_command():
    cfg = MoreConfig()
    assert (cfg.num_tasks, cfg.alpha, cfg.normalize, cfg.reweight) == (5, 0.99, "l2", True)
    assert (cfg.head, cfg.task_key, cfg.ece_bins) == ("auto", "task", (5, 10, 20))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 2.0}, "num_tasks"),
        ({"num_tasks": True}, "num_tasks"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"normalize": "loss"}, "normalize"),
        ({"reweight": 1}, "reweight"),
        ({"head": ""}, "head"),
        ({"task_key": 3}, "task_key"),
        ({"ece_bins": (0,)}, "ece_bins"),
        ({"ece_bins": [10]}, "ece_bins"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MoreConfig.{field}"):
        MoreConfig(**kwargs)


def test_entry_point_metadata_recipe_round_trip_and_family_properties_pass_the_kit():
    cls = check_entry_point("more")
    assert cls is More
    check_metadata(cls, "more")
    config = check_recipe_roundtrip(
        "more", {"num_tasks": 3, "alpha": 0.5, "head": "model.head.*", "ece_bins": [10]}
    )
    assert config == MoreConfig(num_tasks=3, alpha=0.5, head="model.head.*", ece_bins=(10,))
    # the kit's objective and metric checks use a tiny classifier without task ids
    with pytest.warns(UserWarning, match="no 'task' ids"):
        check_family("more")
    assert More.strategies["fsdp2"] == "unsupported" and More.columns_ok is False
    assert "trainer.py" in More.paper.checked_against and "e7baee6" in More.paper.checked_against


# -- objectives ------------------------------------------------------------------------------------
def test_objective_terms_average_to_the_mean_ranking_loss_of_each_task():
    plugin = More(MoreConfig(num_tasks=4))
    batch, outputs = batch_of([0.0, 1.0, -1.0, 2.0, 0.5, 0.0], [0, 0, 1, 2, 2, 2])
    terms = plugin.objective_terms(module=None, batch=batch, outputs=outputs, ctx=context(0))
    assert list(terms) == ["task0", "task1", "task2", "task3"]
    nll = -torch.nn.functional.logsigmoid(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, 0.0]))
    # L_0 = mean(nll[0:2]), L_1 = nll[2], L_2 = mean(nll[3:6]); task 3 has no pair: 0
    expected = [nll[:2].mean(), nll[2], nll[3:].mean(), torch.tensor(0.0)]
    for (name, term), value in zip(terms.items(), expected, strict=True):
        assert term.shape == (6,)
        assert_close(term.mean(), value, msg=name)
    assert plugin._counts.tolist() == [2.0, 1.0, 3.0, 0.0]
    (grad,) = torch.autograd.grad(terms["task1"].mean(), outputs["logits"])
    # only the pair of task 1 has a gradient: d/dr_chosen −log σ(r_c − r_r) = −σ(−m) at m = −1
    assert_close(
        grad[:, 0],
        torch.tensor([0.0, 0.0, -torch.sigmoid(torch.tensor(1.0)).item(), 0.0, 0.0, 0.0]),
    )


def test_task_ids_out_of_range_are_refused_and_missing_ids_warn_once():
    plugin = More(MoreConfig(num_tasks=2))
    batch, outputs = batch_of([0.0, 1.0], [0, 2])
    with pytest.raises(ValueError, match=r"more: task ids must lie in \[0, 2\)"):
        plugin.objective_terms(module=None, batch=batch, outputs=outputs, ctx=context(0))
    del batch["task"]
    with pytest.warns(UserWarning, match="every pair counts as task 0"):
        terms = plugin.objective_terms(module=None, batch=batch, outputs=outputs, ctx=context(0))
    assert terms["task1"].abs().sum().item() == 0.0
    with pytest.raises(ValueError, match=r"outputs\['logits'\] of shape \[B, M >= 2\]"):
        plugin.objective_terms(
            module=None, batch=batch, outputs={"logits": torch.zeros(2)}, ctx=context(0)
        )


# -- surgery ----------------------------------------------------------------------------------------
def test_surgery_keeps_an_ema_of_the_head_gradients_and_weighs_the_normalized_ones():
    plugin = More(MoreConfig(num_tasks=3, alpha=0.5))
    ctx = context(0)
    # step 1, no counts known (balanced): m = ½·G
    first = [[1.0, 0.0], [0.0, 2.0], [0.0, 3.0]]
    d = plugin.surgery_combine(grads=gset(first), ctx=ctx)
    assert_close(plugin.average, 0.5 * torch.tensor(first))
    # ĝ = (1,0), (0,1), (0,1): min-norm point ½(1,0) + ½(0,1), with ½ split over tasks 1, 2 as
    # Frank–Wolfe leaves it (the pair (0, 1) first: λ = (½, ½, 0)); c = λ (balanced counts)
    assert_close(d.weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert_close(d.vector, torch.tensor([0.5, 1.0]))
    assert ctx.logged["more/lambda_task0"] == pytest.approx(0.5)
    assert ctx.logged["more/min_norm"] == pytest.approx(0.5**0.5)
    # step 2, task 2 has no pair in the batch: its EMA stays, λ_2 = c_2 = 0
    batch, outputs = batch_of([0.0, 0.0, 0.0], [0, 1, 1])  # N = (1, 2, 0)
    plugin.objective_terms(module=None, batch=batch, outputs=outputs, ctx=ctx)
    second = [[0.0, 1.0], [1.0, 0.0], [5.0, 5.0]]
    d = plugin.surgery_combine(grads=gset(second), ctx=ctx)
    # ½·m + ½·g: (0.25, 0.5), (0.5, 0.5); row 2 keeps (0, 1.5)
    assert_close(plugin.average, torch.tensor([[0.25, 0.5], [0.5, 0.5], [0.0, 1.5]]))
    # ĝ₀ = (1,2)/√5, ĝ₁ = (1,1)/√2: two unit vectors, λ = (½, ½, 0);
    # c = λ·T'·N_t/N = (½·2·⅓, ½·2·⅔, 0) = (⅓, ⅔, 0)
    assert_close(d.weights, torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="weighs its own objectives"):
        plugin.objective_terms(module=None, batch=batch, outputs=outputs, ctx=ctx)
        plugin.surgery_combine(grads=gset(second, names=("task0", "task1", "loss")), ctx=ctx)


def test_reweight_false_weighs_each_task_by_its_share_of_the_pairs():
    plugin = More(MoreConfig(num_tasks=3, reweight=False))
    batch, outputs = batch_of([0.0] * 6, [0, 0, 0, 1, 1, 2])
    plugin.objective_terms(module=None, batch=batch, outputs=outputs, ctx=context(0))
    d = plugin.surgery_combine(grads=gset([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), ctx=context(0))
    assert_close(d.weights, torch.tensor([0.5, 2 / 6, 1 / 6], dtype=torch.float64))  # N_t / N


def test_surgery_parameters_default_to_the_reward_head():
    module = HookedModule(RewardMLP(4, RewardMLPConfig(hidden=(8,))))
    names = [n for n, _ in module.named_parameters()]
    assert More().surgery_parameters(module=module, names=names) == ["model.head.weight"]
    pattern = More(MoreConfig(head="model.encoder.*"))
    assert pattern.surgery_parameters(module=module, names=names) == [
        "model.encoder.0.weight",
        "model.encoder.0.bias",
    ]
    with pytest.raises(
        ValueError, match="head pattern 'reward_head.*' matches no trainable parameter"
    ):
        More(MoreConfig(head="reward_head.*")).surgery_parameters(module=module, names=names)


def test_state_round_trips_and_a_loaded_plugin_continues_identically():
    a = More(MoreConfig(num_tasks=3))
    assert a.state_dict() == {}
    a.surgery_combine(grads=gset([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]]), ctx=context(0))
    b = More(MoreConfig(num_tasks=3))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.average, a.average) and b.average_names == a.average_names
    nxt = [[0.5, 0.5], [0.0, 1.0], [-2.0, 0.0]]
    da, db = (p.surgery_combine(grads=gset(nxt), ctx=context(1)) for p in (a, b))
    assert torch.equal(da.vector, db.vector) and torch.equal(a.average, b.average)
    b.load_state_dict({})
    assert b.average is None


def test_metric_build_gives_the_ece_at_the_configured_bins():
    metrics = More(MoreConfig(ece_bins=(5, 20))).metric_build(module=None, ctx=context(0))
    assert sorted(metrics) == ["rm_ece_bin20", "rm_ece_bin5"]
    assert all(isinstance(m, PreferenceCalibrationError) for m in metrics.values())
    assert metrics["rm_ece_bin20"].n_bins == 20


def test_setup_checks_the_training_sets_task_ids_against_num_tasks():
    dm = build_datamodule("diverse-preferences", {"num_tasks": 3}, seed=0)
    module = SimpleNamespace(trainer=SimpleNamespace(datamodule=dm))
    More(MoreConfig(num_tasks=3)).lifecycle_setup(module=module, ctx=context(0))
    with pytest.raises(
        ValueError, match=r"num_tasks is 5, but the training set holds the task ids \[0, 1, 2\]"
    ):
        More(MoreConfig(num_tasks=5)).lifecycle_setup(module=module, ctx=context(0))
    with pytest.raises(ValueError, match="the training set has no 'source' field"):
        More(MoreConfig(num_tasks=3, task_key="source")).lifecycle_setup(
            module=module, ctx=context(0)
        )


# -- the task -----------------------------------------------------------------------------------------
def test_diverse_preferences_share_u_and_split_into_two_camps():
    dm = build_datamodule(
        "diverse-preferences", {"num_tasks": 4, "shared": 0.4, "pairs_per_task": 2000}, seed=1
    )
    w = dm.utilities
    cos = w @ w.T  # unit vectors
    rho2 = 0.4**2
    assert_close(cos.diagonal(), torch.ones(4))
    for a, b in ((0, 2), (1, 3)):  # same camp
        assert_close(cos[a, b], torch.tensor(1.0))
    for a, b in ((0, 1), (2, 3), (0, 3)):  # across the camps
        assert_close(cos[a, b], torch.tensor(2 * rho2 - 1))
    t = dm.train_set.tensors
    assert t["input"].shape == (8000, 2, 8) and t["task"].bincount().tolist() == [2000] * 4
    assert bool((t["target"] == 0).all())
    # Bradley–Terry labels with β = 3: the chosen response has the higher utility most of the time
    agree = (((t["input"][:, 0] - t["input"][:, 1]) * w[t["task"]]).sum(-1) > 0).float().mean()
    assert 0.75 < float(agree) < 0.95


def test_reward_mlp_scores_each_response_with_a_bias_free_head():
    dm = build_datamodule("diverse-preferences", None, seed=0)
    model = build_model("reward-mlp", {"hidden": [16]}, dm.info)
    assert model(dm.train_set.tensors["input"][:5]).shape == (5, 2)
    assert model.head.bias is None and model.head.weight.shape == (1, 16)
    assert isinstance(
        build_model("reward-mlp", {"hidden": []}, dm.info).encoder, torch.nn.Sequential
    )
    with pytest.raises(ValueError, match="model reward-mlp needs inputs of shape"):
        build_model("reward-mlp", None, build_datamodule("regression", None, seed=0).info)


# -- recipes ------------------------------------------------------------------------------------------
def test_the_example_recipe_and_the_method_card_snippet_validate():
    recipe = R.load(ROOT / "recipes" / "more.yaml")
    assert [p.name for p in recipe.plugins] == ["more"]
    card = (ROOT / "plugins" / "more" / "README.md").read_text()
    (snippet,) = re.findall(r"## Recipe\n\n```yaml\n(.*?)```", card, re.S)
    raw = yaml.safe_load(snippet)
    base = {"model": {"name": "reward-mlp"}, "data": {"name": "diverse-preferences"}}
    recipe = R.validate({**base, "trainer": {"max_steps": 1}, **raw})
    assert recipe.plugins[0].config == MoreConfig(num_tasks=3)
