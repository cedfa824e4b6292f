"""Tests of ``dsee``: the conformance kit, the parametrization and the support by hand, the
step-2 importance, pruning exactly in a run, resume, stages, 2 processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.reparam import merge
from paperhooks.testing import assert_nested_equal, assert_states_close, load_checkpoint
from paperhooks.testing.conformance import PluginConformance, tiny_recipe
from paperhooks.testing.families import tiny_module
from paperhooks.testing.runs import _fit
from paperhooks_dsee import Dsee, DseeConfig, DseeDelta, dsee_delta, grebsmo_sparse, support

RECIPE = Path(__file__).parents[3] / "recipes" / "dsee.yaml"
SMALL = {"r": 2, "num_sparse": 8, "iters": 2}


class TestConformance(PluginConformance):
    name = "dsee"
    plugin_config = SMALL


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [name for name, _ in recipe.stages] == ["pretrain", "adapt", "prune-tune"]
    assert [p.name for p in recipe.stages[2][1].plugins] == [
        "dsee",
        "one-shot-pruning",
        "uniform-allocation",
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"num_sparse": -1}, "num_sparse"),
        ({"alpha": -1.0}, "alpha"),
        ({"prune_mode": "x"}, "prune_mode"),
        ({"iters": 0}, "iters"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DseeConfig.{field}"):
        DseeConfig(**kwargs)


def test_delta_by_hand():
    # α = 4, r = 2 → α/r = 2. B A = [[1, 0], [0, 1]] [[1, 2], [3, 4]] = [[1, 2], [3, 4]];
    # S ⊙ Ω = [[5, 0], [0, 0]] (Ω keeps (0, 0) only, S = 5 everywhere) → ΔW = 2·[[6, 2], [3, 4]]
    A, B = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.eye(2)
    S, omega = torch.full((2, 2), 5.0), torch.tensor([[True, False], [False, False]])
    assert_close(dsee_delta(A, B, S, omega, 4.0 / 2), torch.tensor([[12.0, 4.0], [6.0, 8.0]]))


def test_support_is_the_top_n_by_hand():
    S = torch.tensor([[0.1, -3.0, 2.0], [2.0, 0.0, -0.5]])
    # |S| = .1, 3, 2, 2, 0, .5 → top 2: (0, 1) and the first 2.0, (0, 2); top 3 adds (1, 0)
    assert support(S, 2).nonzero().tolist() == [[0, 1], [0, 2]]
    assert support(S, 3).nonzero().tolist() == [[0, 1], [0, 2], [1, 0]]
    assert int(support(S, 0).sum()) == 0


def test_grebsmo_finds_the_spike_of_a_rank_one_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 1, generator=g) @ torch.randn(1, 16, generator=g)
    W[7, 11] += 8.0
    S = grebsmo_sparse(W, iters=1, generator=torch.Generator().manual_seed(1))
    assert support(S, 1).nonzero().tolist() == [[7, 11]]
    # the official 100 outer iterations reach full rank on so small a matrix: S̃ = 0 (card)
    assert (
        int((grebsmo_sparse(W, iters=100, generator=torch.Generator().manual_seed(1)) != 0).sum())
        == 0
    )


def test_setup_keeps_the_function_freezes_w_and_trains_s_on_omega_only():
    module = tiny_module()
    x = torch.randn(5, 8)
    before = module.model(x).detach()
    plugin = Dsee(DseeConfig(**SMALL))
    plugin.reparam_setup(module=module, ctx=StepContext(seed=3))
    assert_close(module.model(x), before)  # B = 0, S = 0
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"0.parametrizations.weight.0.{k}" for k in "ABS"
    }  # head skipped, W frozen
    delta = module.model[0].parametrizations.weight[0]
    assert isinstance(delta, DseeDelta) and int(delta.omega.sum()) == 8
    module.model(x).square().sum().backward()
    assert (
        bool((delta.S.grad[~delta.omega] == 0).all()) and delta.S.grad[delta.omega].abs().sum() > 0
    )
    # identical Ω and A for the same seed (every rank), different for another seed
    other = tiny_module()
    Dsee(DseeConfig(**SMALL)).reparam_setup(module=other, ctx=StepContext(seed=3))
    d2 = other.model[0].parametrizations.weight[0]
    assert torch.equal(d2.omega, delta.omega) and torch.equal(d2.A, delta.A)


def test_merge_folds_the_update_in():
    module = tiny_module()
    Dsee(DseeConfig(**SMALL)).reparam_setup(module=module, ctx=StepContext())
    d = module.model[0].parametrizations.weight[0]
    with torch.no_grad():
        d.B.normal_()
        d.S.normal_()
    x = torch.randn(5, 8)
    y = module.model(x).detach()
    w = module.model[0].weight.detach().clone()
    merge(module.model)
    assert_close(module.model(x), y)
    assert_close(module.model[0].weight, w)


@pytest.mark.parametrize("mode", ["abs", "wabs"])
def test_importance_abs_is_the_update_and_wabs_the_merged_weight(mode):
    module = tiny_module()
    plugin = Dsee(DseeConfig(**SMALL, prune_mode=mode))
    plugin.reparam_setup(module=module, ctx=StepContext())
    d = module.model[0].parametrizations.weight[0]
    with torch.no_grad():
        d.B.normal_()
    masks = pruning.add_masks(module.model)
    params = pruning.local_weights(module.model, masks)
    scores = plugin.pruning_scores(params=params, module=module, ctx=StepContext())
    want0 = d.delta().detach().abs() if mode == "abs" else params["0"].abs()
    assert_close(scores["0"], want0)
    assert_close(scores["2"], params["2"].abs())  # not adapted: |W'|


# -- in runs --------------------------------------------------------------------------------------------
PLUGINS = [
    {"name": "dsee", **SMALL},
    {"name": "one-shot-pruning", "sparsity": 0.5, "step": 8},
    {"name": "uniform-allocation"},
]


def _masks(state):
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def test_prune_the_merged_weight_then_tune_exact_sparsity_and_zeros(tmp_path):
    raw = tiny_recipe(
        PLUGINS,
        run_dir=tmp_path / "runs",
        name="run",
        trainer={"max_steps": 14, "limit_val_batches": 0},
    )
    built, _ = _fit(raw)
    model = built.module.model
    masks = {k: m for k, m in _masks(load_checkpoint(built.run_dir)["state_dict"]).items()}
    for k, m in masks.items():  # every layer at exactly 50%
        assert int((~m).sum()) == round(0.5 * m.numel()), k
    for name, layer in pruning.prunable(
        model
    ).items():  # the effective (merged) weight is zero there
        mask = layer.parametrizations.weight[-1].mask
        assert bool((layer.weight.detach()[~mask] == 0).all()), name


def test_resume_after_the_pruning_step_is_bit_identical(tmp_path):
    raw = tiny_recipe(
        PLUGINS,
        run_dir=tmp_path / "runs",
        name="full",
        trainer={"max_steps": 14, "checkpoint_every_n_steps": 10, "limit_val_batches": 0},
    )
    full, _ = _fit(raw)
    end = load_checkpoint(full.run_dir)
    again = load_checkpoint(
        _fit({**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step10.ckpt")[
            0
        ].run_dir
    )
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert (
        end["paperhooks"]["sparsity"]
        == again["paperhooks"]["sparsity"]
        == pytest.approx(0.5, abs=0.01)
    )


def test_abs_importance_refuses_fresh_adapters():
    module = tiny_module()
    plugin = Dsee(DseeConfig(**SMALL))
    plugin.reparam_setup(module=module, ctx=StepContext())
    masks = pruning.add_masks(module.model)
    with pytest.raises(ValueError, match="prune_mode: wabs"):
        plugin.pruning_scores(
            params=pruning.local_weights(module.model, masks), module=module, ctx=StepContext()
        )


STAGES = [
    {
        "name": "adapt",
        "trainer": {"max_steps": 6},
        "plugins": [{"name": "dsee", **SMALL, "prune_mode": "wabs"}],
    },
    {
        "name": "prune-tune",
        "trainer": {"max_steps": 8, "checkpoint_every_n_steps": 4},
        "plugins": [
            {"name": "dsee", **SMALL, "prune_mode": "wabs"},
            {"name": "one-shot-pruning", "sparsity": 0.5, "step": 0},
            {"name": "uniform-allocation"},
        ],
    },
]


def _staged(tmp_path, name):
    raw = tiny_recipe([], run_dir=tmp_path / "runs", name=name, trainer={"limit_val_batches": 0})
    raw["stages"] = STAGES
    return raw


def _stage_ckpt(run, i, name, ckpt="last.ckpt"):
    return torch.load(
        run / "stages" / f"{i}-{name}" / "checkpoints" / ckpt, map_location="cpu", weights_only=True
    )


def test_stages_prune_the_merged_weight_and_tune_again_resume_between_and_inside(tmp_path):
    full, _ = _fit(_staged(tmp_path, "full"))
    first, second = (
        _stage_ckpt(full.run_dir, 0, "adapt"),
        _stage_ckpt(full.run_dir, 1, "prune-tune"),
    )
    masks = _masks(second["state_dict"])
    assert masks and all(int((~m).sum()) == round(0.5 * m.numel()) for m in masks.values())
    # stage 2 starts from stage 1's merged weight: its frozen W is W + ΔW of stage 1, masked
    sd1, sd2 = first["state_dict"], second["state_dict"]
    adapted = [k[: -len(".0.omega")] for k in sd1 if k.endswith(".parametrizations.weight.0.omega")]
    assert adapted
    for d in adapted:
        p = {k[len(d) + 3 :]: v for k, v in sd1.items() if k.startswith(d + ".0.")}
        merged = sd1[f"{d}.original"] + (32.0 / 2) * (p["B"] @ p["A"] + p["S"] * p["omega"])
        assert_close(
            sd2[f"{d}.original"], merged
        )  # stage 2's frozen W is stage 1's merged W' (masked on top)
        assert int(sd2[f"{d}.1.mask"].sum()) == round(0.5 * merged.numel())
    for stage, ckpt in (("0-adapt", "last.ckpt"), ("1-prune-tune", "step4.ckpt")):
        resumed, _ = _fit(
            _staged(tmp_path, f"resumed-{stage}"),
            resume=full.run_dir / "stages" / stage / "checkpoints" / ckpt,
        )
        again = _stage_ckpt(resumed.run_dir, 1, "prune-tune")
        assert_states_close(second["state_dict"], again["state_dict"], atol=0)


@pytest.mark.slow
def test_two_processes_with_pruning_hold_identical_masks_and_equal_one_process(tmp_path):
    from omegaconf import OmegaConf

    from paperhooks.testing import fit_cli

    raw = tiny_recipe(
        PLUGINS,
        run_dir=tmp_path / "runs",
        trainer={"max_steps": 12, "limit_val_batches": 0},
        batch_size=64,
        dropout=0.0,
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(path, ["name=ddp", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
    )
    masks = _masks(one["state_dict"])
    assert masks
    for k, m in masks.items():
        assert torch.equal(m, many["state_dict"][k]), k
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
