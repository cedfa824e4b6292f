"""Tests of ``rd-pruning``: the conformance kit, the DP worked out by hand and against brute
force, exact counts, masks through training / resume / 2 processes, and the effect on digits."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import PluginConformance, check_family, tiny_recipe
from paperhooks.testing.families import tiny_batch, tiny_module
from paperhooks.testing.runs import _fit
from paperhooks_rd_pruning import (
    RdPruning,
    RdPruningConfig,
    brute_force_allocation,
    dp_allocation,
    grid_pruned_counts,
    interpolate,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "rd-pruning.yaml"
T = torch.tensor


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, a few steps, resume (the kit runs the plugin
    alone: with no schedule nothing is pruned; the pruning runs are below)."""

    name = "rd-pruning"
    plugin_config = {"maxsps": 10}

    def test_family_properties_hold(self) -> None:
        # check_pruning calls pruning_allocate on the kit's tiny model: attach the same model
        # (masked) and a calibration batch first, as lifecycle_setup does in a run
        plugin = RdPruning(RdPruningConfig(maxsps=10))
        module = tiny_module()
        pruning.add_masks(module.model)
        plugin.attach(module, tiny_batch(n=32))
        check_family(plugin)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["one-shot-pruning", "rd-pruning"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"maxsps": 0}, "maxsps"),
        ({"calib_size": 0}, "calib_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"worst_case": 1}, "worst_case"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RdPruningConfig.{field}"):
        RdPruningConfig(**kwargs)


# -- the grid, the interpolation, the DP: by hand ----------------------------------------------------
def test_grid_counts_by_hand():
    # n = 10, maxsps = 4: a = 0, .25, .5, .75, 1 → round(a·10) = 0, 2 (2.5 → even), 5, 8 (7.5 → even), 10
    assert grid_pruned_counts(10, 0, 4).tolist() == [0, 2, 5, 8, 10]
    # 3 entries already pruned: amounts below them are clamped (pruned weights stay pruned)
    assert grid_pruned_counts(10, 3, 4).tolist() == [3, 3, 5, 8, 10]


def test_interpolation_by_hand():
    # points (kept, δ): (8, 0), (4, 2), (0, 20); at 2: 20 + (2 − 20)·2/4 = 11; at 6: 2 − 2·2/4 = 1
    ks, ds = T([8, 4, 0]), T([0.0, 2.0, 20.0], dtype=torch.float64)
    assert interpolate(ks, ds, T([0, 2, 4, 6, 8])).tolist() == [20.0, 11.0, 2.0, 1.0, 0.0]


A = (T([4, 2, 0]), T([0.0, 1.0, 10.0], dtype=torch.float64))  # n = 4, maxsps = 2
B = (T([4, 2, 0]), T([0.0, 3.0, 12.0], dtype=torch.float64))  # n = 4
C = (
    T([8, 4, 0]),
    T([0.0, 2.0, 20.0], dtype=torch.float64),
)  # n = 8, the largest: taken last, interpolated


@pytest.mark.parametrize(
    ("budget", "expected", "cost"),
    [
        # K = 8 of 16 (50%): (A, B, C) = (2, 2, 4) costs 1 + 3 + 2 = 6; the others: (4, 4, 0) 20, (4, 2, 2) 0 + 3 + 11 = 14,
        # (2, 4, 2) 12, (4, 0, 4) 14, (0, 4, 4) 12, (2, 0, 6) 14, (0, 2, 6) 14, (0, 0, 8) 22
        (8, [2, 2, 4], 6.0),
        # K = 10: (2, 4, 4) costs 1 + 0 + 2 = 3; (4, 2, 4) 5, (2, 2, 6) 5, (4, 4, 2) 11, (0, 4, 6) 11, (4, 0, 6) 13, ...
        (10, [2, 4, 4], 3.0),
    ],
)
def test_dp_by_hand(budget, expected, cost):
    layers = [A, B, C]
    kept = dp_allocation([k for k, _ in layers], [d for _, d in layers], [4, 4, 8], budget)
    assert kept == expected and sum(kept) == budget
    assert brute_force_allocation(
        [k for k, _ in layers], [d for _, d in layers], [4, 4, 8], budget
    ) == (expected, cost)


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force_on_small_cases(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(v) for v in torch.randint(3, 12, (4,), generator=g)]
    dead = [int(torch.randint(0, 3, (1,), generator=g)) for _ in sizes]
    alive = [n - d for n, d in zip(sizes, dead, strict=True)]
    kept_grid = [n - grid_pruned_counts(n, d, 4) for n, d in zip(sizes, dead, strict=True)]
    # distortion curves rising as fewer weights are kept (random increments; kept = alive costs 0)
    dist_grid = [
        torch.cat(
            [T([0.0], dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)]
        ).cumsum(0)
        for _ in sizes
    ]
    dist_grid = [
        torch.where(k == a, 0.0, d) for k, d, a in zip(kept_grid, dist_grid, alive, strict=True)
    ]
    for budget in range(0, sum(alive) + 1, 3):
        try:
            want, cost = brute_force_allocation(kept_grid, dist_grid, alive, budget)
        except ValueError:
            with pytest.raises(ValueError, match="no grid combination"):
                dp_allocation(kept_grid, dist_grid, alive, budget)
            continue
        got = dp_allocation(kept_grid, dist_grid, alive, budget)
        assert sum(got) == budget and all(0 <= k <= a for k, a in zip(got, alive, strict=True))
        order = sorted(range(len(sizes)), key=lambda i: alive[i])
        total = sum(
            float(dist_grid[i][(kept_grid[i] == got[i]).nonzero()[0, 0]]) for i in order[:-1]
        )
        total += float(
            interpolate(kept_grid[order[-1]], dist_grid[order[-1]], T([got[order[-1]]]))[0]
        )
        assert total == pytest.approx(cost, abs=1e-12), (budget, got, want)


def test_brute_force_really_enumerates():
    # the enumeration size of the hand case: 3·3 grid pairs, C takes the rest when in [0, 8]
    pairs = [(a, b) for a, b in itertools.product([4, 2, 0], repeat=2) if 0 <= 8 - a - b <= 8]
    assert len(pairs) == 9


# -- the plugin on a model ----------------------------------------------------------------------------
def _attached(seed=0, **cfg):
    module = tiny_module(seed)
    masks = pruning.add_masks(module.model)
    plugin = RdPruning(RdPruningConfig(**{"maxsps": 20, **cfg}))
    plugin.attach(module, tiny_batch(n=64, seed=seed))
    return plugin, module, masks


@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.9])
def test_requested_sparsity_is_reached_exactly_globally_and_per_layer(sparsity):
    plugin, module, masks = _attached()
    scores = pruning.magnitude_scores(pruning.local_weights(module.model, masks))
    keep = plugin.pruning_allocate(scores=scores, sparsity=sparsity, ctx=StepContext())
    total = sum(s.numel() for s in scores.values())
    assert sum(int(k.sum()) for k in keep.values()) == total - round(sparsity * total)
    for k, m in keep.items():  # each layer keeps what the DP chose: its top-|w| entries
        assert int(m.sum()) == plugin.last_kept[k]
        order = torch.argsort(scores[k].reshape(-1), descending=True, stable=True)
        assert torch.equal(m.reshape(-1)[order], torch.arange(m.numel()) < plugin.last_kept[k])


def test_curves_are_the_mean_squared_output_error_by_hand():
    # δ_l(a) = mean over samples and outputs of (Y − Ŷ)², Ŷ with layer l alone pruned to a
    plugin, module, masks = _attached(maxsps=2)
    scores = pruning.magnitude_scores(pruning.local_weights(module.model, masks))
    curves = plugin.curves(scores)
    x = tiny_batch(n=64)["input"]
    y = module.model(x).detach()
    for name, (kept, dist_) in curves.items():
        assert dist_[0] == 0.0  # a = 0: nothing pruned
        mask = masks[name]
        saved = mask.mask.clone()
        mask.mask.zero_()  # a = 1: the whole layer pruned
        want = (y - module.model(x).detach()).double().square().mean()
        mask.mask.copy_(saved)
        assert kept[-1] == 0 and float(dist_[-1]) == pytest.approx(
            float(want), rel=1e-6
        )  # float32 forward
        assert torch.equal(mask.mask, saved)  # the masks are left as they were


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_skipping_points_above_the_budget_gives_the_same_solution(sparsity):
    # curves(scores, K) leaves unmeasured (+inf) the points keeping more than K weights, except
    # the nearest above K (and the current masks, δ = 0 without a forward pass); the measured
    # points equal the full curves and the DP picks the same solution
    plugin, module, masks = _attached()
    scores = pruning.magnitude_scores(pruning.local_weights(module.model, masks))
    total = sum(s.numel() for s in scores.values())
    budget = total - round(sparsity * total)
    full, cut = plugin.curves(scores), plugin.curves(scores, budget)
    names, alive = list(scores), [s.numel() for s in scores.values()]
    skipped = 0
    for k, n in zip(names, alive, strict=True):
        kept, d_full = full[k]
        d_cut = cut[k][1]
        nearest = kept[kept > budget].min() if bool((kept > budget).any()) else -1
        measured = (kept <= budget) | (kept == nearest) | (kept == n)
        assert torch.equal(d_cut[measured], d_full[measured])
        assert bool(torch.isinf(d_cut[~measured]).all())
        skipped += int((~measured).sum())
    assert skipped > 0  # the case really skips points
    solutions = [
        dp_allocation([c[k][0] for k in names], [c[k][1] for k in names], alive, budget)
        for c in (cut, full)
    ]
    assert solutions[0] == solutions[1]


def test_pruned_entries_stay_pruned_in_a_second_allocation():
    plugin, module, masks = _attached()
    for s in (0.5, 0.8):
        w = pruning.local_weights(module.model, masks)
        scores = {k: torch.where(masks[k].mask, v.abs(), -torch.inf) for k, v in w.items()}
        before = {k: m.mask.clone() for k, m in masks.items()}
        keep = plugin.pruning_allocate(scores=scores, sparsity=s, ctx=StepContext())
        assert all(not (keep[k] & ~before[k]).any() for k in keep)
        pruning.set_masks(module.model, masks, keep)
    assert pruning.sparsity_of(masks) == round(
        0.8 * sum(m.mask.numel() for m in masks.values())
    ) / sum(m.mask.numel() for m in masks.values())


# -- in training runs -----------------------------------------------------------------------------------
PLUGINS = [
    {
        "name": "gradual-pruning",
        "final_sparsity": 0.8,
        "begin_step": 2,
        "end_step": 12,
        "frequency": 2,
    },
    {"name": "rd-pruning", "maxsps": 10, "calib_size": 256},
]


def _mask_items(state):
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def test_masked_entries_zero_after_steps_and_sparsity_exact(tmp_path):
    raw = tiny_recipe(
        PLUGINS,
        run_dir=tmp_path / "runs",
        name="run",
        trainer={"max_steps": 16, "limit_val_batches": 0},
    )
    built, _ = _fit(raw)
    state = load_checkpoint(built.run_dir)["state_dict"]
    masks = _mask_items(state)
    n = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * n)
    for k, m in masks.items():
        orig = state[k.replace(".0.mask", ".original")]
        assert bool((orig[~m] == 0).all())  # the stored weight too


def test_resume_in_the_middle_of_the_schedule_is_bit_identical(tmp_path):
    raw = tiny_recipe(
        PLUGINS,
        run_dir=tmp_path / "runs",
        name="full",
        trainer={"max_steps": 16, "checkpoint_every_n_steps": 7, "limit_val_batches": 0},
    )
    full, _ = _fit(raw)
    end = load_checkpoint(full.run_dir)
    mid = load_checkpoint(full.run_dir, "step7.ckpt")
    assert (
        0 < mid["paperhooks"]["sparsity"] < end["paperhooks"]["sparsity"]
    )  # stopped inside the schedule
    again = load_checkpoint(
        _fit({**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step7.ckpt")[
            0
        ].run_dir
    )
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert end["paperhooks"]["sparsity"] == again["paperhooks"]["sparsity"]
    for k, m in _mask_items(again["state_dict"]).items():
        assert bool((again["state_dict"][k.replace(".0.mask", ".original")][~m] == 0).all())


@pytest.mark.slow
def test_two_processes_hold_identical_masks_and_equal_one_process(tmp_path):
    raw = tiny_recipe(
        PLUGINS,
        run_dir=tmp_path / "runs",
        trainer={"max_steps": 14, "limit_val_batches": 0},
        batch_size=64,
        dropout=0.0,
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many_dir = fit_cli(
        path, ["name=ddp", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path
    )
    many = load_checkpoint(many_dir)
    for k, m in _mask_items(one["state_dict"]).items():
        assert torch.equal(m, many["state_dict"][k]), k
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
    assert one["paperhooks"]["sparsity"] == many["paperhooks"]["sparsity"] > 0.79
