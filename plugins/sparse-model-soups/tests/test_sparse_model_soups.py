"""Tests of ``sparse-model-soups``: the conformance kit, the schedules worked out by hand, the
masks of ``torch.nn.utils.prune`` as SMS prunes, and staged SMS runs (phases of soups)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from paperhooks import pruning
from paperhooks.recipe import load as load_recipe
from paperhooks.run import fit
from paperhooks.testing import assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import PluginConformance
from paperhooks_sparse_model_soups import (
    SparseModelSoupsConfig,
    llr_factor,
    per_phase_fraction,
    phase_sparsity,
    pruned_after_phase,
    pruned_counts,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "sparse-model-soups.yaml"


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, pruning properties, a few steps, bit-identical
    resume, 2 processes equal to 1. The kit's recipe has a cosine scheduler, so LLR is off here
    (LLR is checked in the staged runs below)."""

    name = "sparse-model-soups"
    plugin_config = {"goal_sparsity": 0.5, "retrain_schedule": "none"}


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [n for n, _ in recipe.stages] == ["dense", "phase1", "phase2"]
    assert [p.name for p in recipe.stages[1][1].plugins] == ["sparse-model-soups"]
    assert len(recipe.stages[2][1].ingredients) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"goal_sparsity": 1.0}, "goal_sparsity"),
        ({"goal_sparsity": "0.5"}, "goal_sparsity"),
        ({"n_phases": 0}, "n_phases"),
        ({"n_phases": 2, "phase": 3}, "phase"),
        ({"retrain_schedule": "cosine"}, "retrain_schedule"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SparseModelSoupsConfig.{field}"):
        SparseModelSoupsConfig(**kwargs)


# -- the schedules, by hand ------------------------------------------------------------------------
def test_phase_schedule_by_hand():
    # s = 0.9 in 2 phases: each prunes 1 − 0.1^{1/2} = 1 − 0.316228 = 0.683772 of what remains,
    # so phase 1 ends at 0.683772 and phase 2 at 1 − 0.316228² = 0.9.
    assert per_phase_fraction(0.9, 2) == pytest.approx(0.6837722, abs=1e-7)
    assert phase_sparsity(0.9, 2, 1) == pytest.approx(0.6837722, abs=1e-7)
    assert phase_sparsity(0.9, 2, 2) == pytest.approx(0.9)
    # Counts of 1000 weights: round(683.772) = 684; then 316 remain, round(0.683772·316 = 216.07)
    # = 216 more: 900.
    assert pruned_counts(1000, 0.9, 2) == [0, 684, 900]
    # s = 0.875 in 3 phases: f = 1 − 0.125^{1/3} = 0.5. Of 10 weights: round(5) = 5; then
    # round(0.5·5 = 2.5) = 2 (Python rounds halves to even, as torch.nn.utils.prune does): 7;
    # then round(0.5·3 = 1.5) = 2: 9 pruned, not round(0.875·10) = 9 by accident of rounding
    # but through the remaining counts — phase 2 ends at 0.7, not at 1 − 0.5² = 0.75.
    assert per_phase_fraction(0.875, 3) == pytest.approx(0.5)
    assert pruned_counts(10, 0.875, 3) == [0, 5, 7, 9]
    assert pruned_after_phase(10, 5, 0.875, 3) == 7


def test_llr_by_hand():
    # T = 20 steps, W = int(0.1·20) = 2 warm-up steps: (1 − cos(πt/2))/2 = 0, 0.5; then
    # (20 − t)/18: t = 2 → 1, t = 11 → 0.5, t = 19 → 1/18; past the end 0.
    assert llr_factor(0, 20) == 0.0
    assert llr_factor(1, 20) == pytest.approx(0.5)
    assert llr_factor(2, 20) == 1.0
    assert llr_factor(11, 20) == pytest.approx(0.5)
    assert llr_factor(19, 20) == pytest.approx(1 / 18)
    assert llr_factor(20, 20) == 0.0
    # T = 5: W = int(0.5) = 0, no warm-up: (5 − t)/5
    assert llr_factor(0, 5) == 1.0
    assert llr_factor(1, 5) == pytest.approx(0.8)
    # W = 4 of T = 40: t = 1 → (1 − cos(π/4))/2 = (1 − 0.707107)/2 = 0.146447
    assert llr_factor(1, 40) == pytest.approx(0.1464466, abs=1e-7)


def test_phases_equal_torch_prune_global_unstructured_as_sms_calls_it():
    """SMS prunes each phase with ``prune.global_unstructured(L1Unstructured, amount=f)`` on
    modules that keep their masks; the core's global allocation at the count of
    :func:`pruned_after_phase` (pruned entries ranked lowest) gives the same masks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5))
    layers = [net[0], net[2]]
    n = sum(m.weight.numel() for m in layers)
    s, phases = 0.93, 3
    ours = {str(i): torch.ones_like(m.weight, dtype=torch.bool) for i, m in enumerate(layers)}
    for _ in range(phases):
        prune.global_unstructured(
            [(m, "weight") for m in layers],
            pruning_method=prune.L1Unstructured,
            amount=per_phase_fraction(s, phases),
        )
        pruned = sum(int((~k).sum()) for k in ours.values())
        target = pruned_after_phase(n, pruned, s, phases) / n
        w = {str(i): m.weight_orig for i, m in enumerate(layers)}
        scores = {k: torch.where(ours[k], w[k].detach().abs(), -torch.inf) for k in w}
        ours = pruning.global_allocation(scores, target)
        for i, m in enumerate(layers):
            assert torch.equal(ours[str(i)], m.weight_mask.bool())
    assert sum(int((~k).sum()) for k in ours.values()) == pruned_counts(n, s, phases)[-1]


# -- staged SMS runs ------------------------------------------------------------------------------
STAGED = """
seed: 3
name: sms
model: {name: mlp, hidden: [24]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
trainer: {max_steps: 8, enable_progress_bar: false, limit_val_batches: 1.0}
stages:
  - name: dense
  - name: phase1
    trainer: {max_steps: 10, checkpoint_every_n_steps: 5}
    plugins: [{name: sparse-model-soups, goal_sparsity: 0.8, n_phases: 2, phase: 1}]
    ingredients: [{seed: 11}, {seed: 12, optimizer: {weight_decay: 0.001}}]
    soup: {method: uniform}
  - name: phase2
    trainer: {max_steps: 10, checkpoint_every_n_steps: 5}
    plugins: [{name: sparse-model-soups, goal_sparsity: 0.8, n_phases: 2, phase: 2}]
    ingredients: [{seed: 21}, {seed: 22}]
    soup: {method: greedy}
"""


@pytest.fixture
def staged(tmp_path):
    path = tmp_path / "sms.yaml"
    path.write_text(STAGED + f"run_dir: {tmp_path}/runs\n")
    return path


def _masks(state):
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def test_phases_of_soups_reach_the_schedule_exactly_and_keep_pruned_weights_zero(staged):
    built, metrics = fit(load_recipe(staged))
    run = built.run_dir
    n = 64 * 24 + 24 * 10
    counts = pruned_counts(n, 0.8, 2)
    for i, name in ((1, "phase1"), (2, "phase2")):
        stage = run / "stages" / f"{i}-{name}"
        ends = [load_checkpoint(stage / f"ingredient-{j}")["state_dict"] for j in range(2)]
        m0, m1 = _masks(ends[0]), _masks(ends[1])
        assert sorted(m0) == sorted(m1) and all(
            torch.equal(m0[k], m1[k]) for k in m0
        )  # one mask per phase
        assert sum(int((~v).sum()) for v in m0.values()) == counts[i]  # exactly, globally
        soup_w = torch.load(stage / "soup_weights.pt", weights_only=True)
        soup_m = torch.load(stage / "soup_masks.pt", weights_only=True)
        for layer, mask in soup_m.items():
            assert torch.equal(mask, m0[f"model.{layer}.parametrizations.weight.0.mask"])
            assert bool(
                (soup_w[f"{layer}.weight"][~mask] == 0).all()
            )  # sparsity preserved by the soup
            for e in ends:  # and in every ingredient, stored weight included
                assert bool(
                    (e[f"model.{layer}.parametrizations.weight.original"][~mask] == 0).all()
                )
        if i == 1:  # uniform soup: the mean of the ingredients' effective weights
            for layer, mask in soup_m.items():
                eff = [e[f"model.{layer}.parametrizations.weight.original"] * mask for e in ends]
                torch.testing.assert_close(
                    soup_w[f"{layer}.weight"], (eff[0] + eff[1]) / 2, atol=1e-7, rtol=0
                )
    # phase 2 pruned only weights phase 1 kept
    p1 = torch.load(run / "stages" / "1-phase1" / "soup_masks.pt", weights_only=True)
    p2 = torch.load(run / "stages" / "2-phase2" / "soup_masks.pt", weights_only=True)
    assert all(bool((p2[k] <= p1[k]).all()) for k in p1)
    # the logged global sparsity is the schedule's 1 − (1 − 0.8)^{k/2} (up to the rounding of counts)
    record = json.loads((run / "stages.json").read_text())
    for k in (1, 2):
        logged = record[k]["ingredients"][0]["metrics"]["pruning/sparsity"]
        assert logged == pytest.approx(counts[k] / n, abs=1e-6) and logged == pytest.approx(
            phase_sparsity(0.8, 2, k), abs=1e-3
        )
    assert "val/acc" in metrics


def test_llr_sets_the_learning_rate_of_every_step(staged):
    """Phase of T = 10 steps from η = 0.1: W = 1 warm-up step, so step t runs at
    0.1·(10 − t)/9 for t ≥ 1 and 0 at t = 0; the checkpoint after 5 steps holds the rate of
    step 5, 0.1·5/9, and the last one that of step 10, 0."""
    built, _ = fit(load_recipe(staged))
    stage = built.run_dir / "stages" / "1-phase1" / "ingredient-0"
    mid, end = load_checkpoint(stage, "step5.ckpt"), load_checkpoint(stage)
    assert mid["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.1 * 5 / 9)
    assert end["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    assert mid["optimizer_states"][0]["param_groups"][0]["sms_max_lr"] == 0.1


def test_a_phase_that_does_not_follow_its_predecessor_is_refused(staged):
    with pytest.raises(ValueError, match="phase 2 of 2 .* must start from the masks of phase 1"):
        fit(load_recipe(staged, ["stages.1.plugins.0.phase=2"]))


def test_llr_refuses_a_second_scheduler(staged):
    with pytest.raises(ValueError, match="set optimizer.scheduler: none"):
        fit(load_recipe(staged, ["optimizer.scheduler=cosine"]))


@pytest.mark.parametrize(
    "ckpt",
    ["2-phase2/ingredient-0/checkpoints/step5.ckpt", "1-phase1/ingredient-1/checkpoints/last.ckpt"],
)
def test_resume_inside_a_phase_and_between_phases_is_bit_identical(staged, ckpt):
    full, _ = fit(load_recipe(staged, ["name=full"]))
    resumed, _ = fit(
        load_recipe(staged, ["name=resumed"]), resume=str(full.run_dir / "stages" / ckpt)
    )
    for name in ("soup_weights.pt", "soup_masks.pt"):
        a = torch.load(full.run_dir / "stages" / "2-phase2" / name, weights_only=True)
        b = torch.load(resumed.run_dir / "stages" / "2-phase2" / name, weights_only=True)
        assert_states_close(a, b, atol=0)


@pytest.mark.slow
def test_two_processes_run_the_phases_as_one_process(staged, tmp_path):
    """2 DDP processes on halves of the global batch: identical masks, weights equal to 1
    process, the same soups."""
    one = fit_cli(staged, ["name=one"], cwd=tmp_path)
    two = fit_cli(staged, ["name=two", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
    for stage in ("1-phase1", "2-phase2"):
        for j in range(2):
            a = load_checkpoint(one / "stages" / stage / f"ingredient-{j}")["state_dict"]
            b = load_checkpoint(two / "stages" / stage / f"ingredient-{j}")["state_dict"]
            assert_states_close(a, b, atol=1e-6, rtol=1e-5)
            assert all(torch.equal(a[k], b[k]) for k in _masks(a))
        sa = torch.load(one / "stages" / stage / "soup_masks.pt", weights_only=True)
        sb = torch.load(two / "stages" / stage / "soup_masks.pt", weights_only=True)
        assert_states_close(sa, sb, atol=0)
