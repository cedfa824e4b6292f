"""D-Pruner: G, g̃ and S by hand; masks, resume and 2 processes in fits (with a schedule)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from paperhooks.context import StepContext
from paperhooks.module import HookedModule
from paperhooks.pruning import add_masks, local_weights
from paperhooks.recipe import load as load_recipe
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import (
    check_entry_point,
    check_family,
    check_metadata,
    check_recipe_roundtrip,
)
from paperhooks.testing.families import tiny_batch
from paperhooks.testing.metadata import tiny_recipe
from paperhooks.testing.runs import _fit
from paperhooks_d_pruner import (
    DPruner,
    DPrunerConfig,
    dual_importance_increment,
    general_importance,
    hessian_update,
    refined_gradient,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "d-pruner.yaml"
#: the kit's digits: general = digits 0-4, domain = 5-9, 32 rows each in batches of 8
CAL = {
    "general_classes": [0, 1, 2, 3, 4],
    "domain_classes": [5, 6, 7, 8, 9],
    "general_size": 32,
    "domain_size": 32,
}
#: a schedule that updates the masks at steps 2, 4, ..., 10 (so a resume at step 5 is mid-schedule)
SCHEDULE = {
    "name": "gradual-pruning",
    "final_sparsity": 0.6,
    "begin_step": 2,
    "end_step": 10,
    "frequency": 2,
}


# -- the kit's checks that apply to a criterion ------------------------------------------------------
def test_entry_point_metadata_and_recipe_round_trip():
    check_metadata(check_entry_point("d-pruner"), "d-pruner")
    check_recipe_roundtrip("d-pruner", CAL)


def test_family_properties_hold():
    plugin = DPruner(DPrunerConfig(general_size=6, domain_size=6, batch_size=3))
    rows = {k: v for k, v in tiny_batch().items() if k in ("input", "target")}
    plugin.attach(rows, rows)  # the kit's tiny module has no trainer: calibrate on its batch
    check_family(plugin)


# -- the formulas by hand -----------------------------------------------------------------------------
def test_refined_gradient_and_increment_by_hand():
    # resolved.md #33: g = 0.5, η = 0.03, G = 10, λ = 0.1: 0.1·2·0.0009·10·0.25/1000 = 4.5e-7
    assert refined_gradient(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)
    ).item() == pytest.approx(0.50000045, abs=1e-12)
    # θ = 0.02, g̃ = 0.5: g̃θ = 0.01, (g̃θ)²/2000 = 5e-8, θ³ = 8e-6 → 0.01000805
    inc = dual_importance_increment(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64)
    )
    assert inc.item() == pytest.approx(0.01000805, abs=1e-12)
    # the absolute value: g̃ = −1, θ = 0.5: −0.5 + 0.25/2000 + 0.125 = −0.374875 → 0.374875
    assert dual_importance_increment(torch.tensor(-1.0), torch.tensor(0.5)).item() == pytest.approx(
        0.374875
    )


def test_general_importance_by_hand():
    # W = [[1, 2]], inputs x = [1, 0], [0, 1], [1, 1] (n = 3): Σ x xᵀ = [[2, 1], [1, 2]],
    # H = (2/3)·that = [[4/3, 2/3], [2/3, 4/3]], det = 4/3, H⁻¹ = [[1, −0.5], [−0.5, 1]].
    # Upper Cholesky of H⁻¹: U₁₁ = 1, U₁₂ = −0.5, U₂₂ = √(1 − 0.25) = √0.75.
    # G = W²/U_jj² = [1/1, 4/0.75] = [1, 16/3]  (no damping here)
    xxt = hessian_update(
        torch.zeros(2, 2, dtype=torch.float64), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    )
    assert_close(xxt, torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    G = general_importance(torch.tensor([[1.0, 2.0]]), xxt, 3, percdamp=0.0)
    assert_close(G, torch.tensor([[1.0, 16.0 / 3.0]], dtype=torch.float64))
    # damping δ = 0.01: H + 0.01·(4/3)·I; an input never active gets H_jj = 1 (finite G)
    assert torch.isfinite(
        general_importance(torch.ones(1, 2), torch.tensor([[2.0, 0.0], [0.0, 0.0]]), 3)
    ).all()


def test_scores_are_the_sum_of_per_batch_increments():
    # a 4-3 Linear model, 6 domain rows in batches of 2: S = Σ_b |g̃_b θ + (g̃_b θ)²/2000 + θ³|,
    # with g_b the gradient of the batch's mean cross-entropy, recomputed here independently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    module = HookedModule(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    gx = torch.randn(5, 4)
    plugin = DPruner(DPrunerConfig(general_size=5, domain_size=6, batch_size=2, lam=1e5, lr=1.0))
    plugin.attach(
        {"input": gx, "target": torch.zeros(5, dtype=torch.long)}, {"input": x, "target": y}
    )
    W = model[0].weight
    S = plugin.pruning_scores(params={"0": W.detach()}, module=module, ctx=StepContext())["0"]
    G = general_importance(W.detach(), gx.double().T @ gx.double(), 5)
    assert_close(plugin.last_general["0"], G)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        loss = nn.functional.cross_entropy(model(x[2 * b : 2 * b + 2]), y[2 * b : 2 * b + 2])
        (g,) = torch.autograd.grad(loss, W)
        gt = g.double() + 1e5 * 2 * 1.0 * G * g.double() ** 2 / 1000
        th = W.detach().double()
        expected += (gt * th + (gt * th) ** 2 / 2000 + th**3).abs()
    assert_close(S, expected)


def test_training_scores_sum_each_steps_increment_and_the_step_uses_g_tilde():
    # scores_from: training, 3 SGD steps of a 4-3 Linear model on batches of 2: before each
    # step S += |g̃θ + (g̃θ)²/2000 + θ³| with θ the weights before the step and g the step's
    # gradient; the step then moves by −η·g̃. Both recomputed here by hand from a copy.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    ref = nn.Sequential(nn.Linear(4, 3))
    ref.load_state_dict(model.state_dict())
    module = HookedModule(model)
    module.masks = add_masks(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    gx = torch.randn(5, 4)
    plugin = DPruner(DPrunerConfig(scores_from="training", general_size=5, lam=1e5, lr=1.0))
    plugin.attach(
        {"input": gx, "target": torch.zeros(5, dtype=torch.long)}, {"input": x, "target": y}
    )
    with pytest.raises(ValueError, match="scores_from 'training'.*before any"):
        plugin.pruning_scores(
            params=local_weights(model, module.masks), module=module, ctx=StepContext()
        )
    G = general_importance(ref[0].weight.detach(), gx.double().T @ gx.double(), 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        xb, yb = x[2 * b : 2 * b + 2], y[2 * b : 2 * b + 2]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        plugin.lifecycle_before_optimizer_step(module=module, ctx=StepContext())
        opt.step()
        W, bias = ref[0].weight, ref[0].bias
        g, gb = torch.autograd.grad(nn.functional.cross_entropy(ref(xb), yb), (W, bias))
        gt = g.double() + 1e5 * 2 * 1.0 * G * g.double() ** 2 / 1000
        th = W.detach().double()
        expected += (gt * th + (gt * th) ** 2 / 2000 + th**3).abs()
        with torch.no_grad():  # the plugin's step: g̃ for the weight, g for the bias
            W -= 0.1 * gt.float()
            bias -= 0.1 * gb
        assert_close(local_weights(model, module.masks)["0"], W.detach())
    S = plugin.pruning_scores(
        params=local_weights(model, module.masks), module=module, ctx=StepContext()
    )
    assert_close(plugin.last_general["0"], G)
    assert_close(S["0"], expected)
    assert plugin.state_dict()["steps"] == 3


def test_config_rejects_bad_values_naming_the_field():
    for kwargs, field in (
        ({"lam": -1.0}, "lam"),
        ({"batch_size": 0}, "batch_size"),
        ({"general_classes": ["a"]}, "general_classes"),
        ({"scores_from": "train"}, "scores_from"),
    ):
        with pytest.raises(ValueError, match=f"DPrunerConfig.{field}"):
            DPrunerConfig(**kwargs)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [name for name, _ in recipe.stages] == ["general", "domain"]
    assert [p.name for p in recipe.stages[1][1].plugins] == ["one-shot-pruning", "d-pruner"]
    training = load_recipe(RECIPE.with_name("d-pruner-training.yaml"))
    general, domain = (stage for _, stage in training.stages)
    assert general.data.config.train_classes == (0, 1, 2, 3, 4)
    assert domain.data.config.train_classes == (5, 6, 7, 8, 9)
    assert domain.plugins[1].config.scores_from == "training"


def test_training_on_the_domain_only_takes_G_from_the_general_digits_it_does_not_train_on(tmp_path):
    """With data.train_classes = the domain, the fit's batches hold no general digit; G is
    measured on the training split's digits 0-4 (datamodule.calibration_set), and equals G of
    those rows computed apart, on the same initial weights."""
    from paperhooks import recipe as R
    from paperhooks.run import build

    raw = _raw(tmp_path, "domain-only", "training")
    raw["data"]["train_classes"] = [5, 6, 7, 8, 9]
    built = build(R.validate(raw))
    built.module.configure_model()
    model = built.module.model
    dm = built.datamodule
    assert set(dm.train_set.tensors["target"].tolist()) == {5, 6, 7, 8, 9}
    pool = dm.calibration_set.tensors
    alone = DPruner(DPrunerConfig(**CAL))
    general = pool["target"] < 5
    alone.attach(
        {k: pool[k][general] for k in ("input", "target")},
        {k: pool[k][~general] for k in ("input", "target")},
    )
    masks = add_masks(model)
    module = HookedModule(model)
    with torch.no_grad():
        alone.pruning_scores(params=local_weights(model, masks), module=module, ctx=StepContext())
    empty = DPruner(DPrunerConfig(**CAL))  # a split without digits 0-4: refused, not G of nothing
    empty.attach(*[{k: pool[k][~general] for k in ("input", "target")}] * 2)
    with pytest.raises(
        ValueError, match=r"d-pruner: no calibration row has a class in general_classes \[0, 1"
    ):
        empty.pruning_scores(params=local_weights(model, masks), module=module, ctx=StepContext())
    fitted, _ = _fit(raw)
    (state,) = [
        p["state"]
        for p in load_checkpoint(fitted.run_dir)["paperhooks"]["plugins"]
        if p["name"] == "d-pruner"
    ]
    assert set(state["general"]) == set(alone.last_general)
    for k, g in alone.last_general.items():
        assert_close(state["general"][k].to(g.dtype), g, rtol=1e-6, atol=0)


# -- in fits ----------------------------------------------------------------------------------------------
def _raw(tmp_path: Path, name: str, scores_from: str = "calibration", **trainer):
    return tiny_recipe(
        [SCHEDULE, {"name": "d-pruner", **CAL, "scores_from": scores_from}],
        run_dir=tmp_path / "runs",
        name=name,
        trainer={"max_steps": 12, "limit_val_batches": 0, **trainer},
    )


def _masks(sd):
    return {k: v for k, v in sd.items() if k.endswith(".mask")}


@pytest.mark.parametrize("scores_from", ["calibration", "training"])
def test_exact_sparsity_zeros_and_bit_identical_resume_mid_schedule(tmp_path, scores_from):
    # training: G, the running S and its step count are in the checkpoint (resume at step 5)
    raw = _raw(tmp_path, "full", scores_from, checkpoint_every_n_steps=5)
    full, _ = _fit(raw)
    end, mid = load_checkpoint(full.run_dir), load_checkpoint(full.run_dir, "step5.ckpt")
    for sd, s in ((mid["state_dict"], 0.6 * (1 - (1 - 2 / 8) ** 3)), (end["state_dict"], 0.6)):
        masks = _masks(sd)
        assert len(masks) == 2
        for k, m in masks.items():
            assert int((~m).sum()) == round(s * m.numel())  # per layer, exactly
            w = sd[k.replace("parametrizations.weight.0.mask", "parametrizations.weight.original")]
            assert bool((w[~m] == 0).all())  # pruned entries are zero in the stored weight
    resumed, _ = _fit(
        {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step5.ckpt"
    )
    again = load_checkpoint(resumed.run_dir)
    assert again["global_step"] == 12
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert_nested_equal(end["paperhooks"]["sparsity"], again["paperhooks"]["sparsity"], "sparsity")
    assert_nested_equal(end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugins")
    if scores_from == "training":
        (state,) = [p["state"] for p in mid["paperhooks"]["plugins"] if p["name"] == "d-pruner"]
        assert state["steps"] == 5 and set(state["scores"]) == set(state["general"])


@pytest.mark.slow
@pytest.mark.parametrize("scores_from", ["calibration", "training"])
def test_two_processes_equal_one_with_identical_masks(tmp_path, scores_from):
    # SGD (the kit's optimizer): calibration statistics summed over ranks (whole batches per
    # rank), so both ranks hold one process's S and masks. Adam would amplify float noise on
    # parameters whose true gradient is ~0 (see the card); SGD does not, so 1e-6 holds.
    # training: the hook sees the gradients DDP averaged, so both ranks add the same increments
    raw = tiny_recipe(
        [SCHEDULE, {"name": "d-pruner", **CAL, "scores_from": scores_from}],
        run_dir=tmp_path / "runs",
        trainer={"limit_val_batches": 0},
        batch_size=64,
        dropout=0.0,
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one", "trainer.max_steps=8"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(
            path,
            ["name=ddp", "trainer.max_steps=8", "trainer.devices=2", "trainer.strategy=ddp"],
            cwd=tmp_path,
        )
    )
    m1, m2 = _masks(one["state_dict"]), _masks(many["state_dict"])
    assert all(torch.equal(m1[k], m2[k]) for k in m1) and any(
        int((~m).sum()) > 0 for m in m1.values()
    )
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
