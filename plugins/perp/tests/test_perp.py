"""Tests of ``perp``: the conformance kit, MaskLoRA / ScaleLoRA worked out by hand, the
trainable set, and staged runs (prune → PERP retrain) through the core."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import pruning
from paperhooks.recipe import load as load_recipe
from paperhooks.reparam import merge
from paperhooks.run import fit
from paperhooks.testing import assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import PluginConformance
from paperhooks_perp import MaskLoRA, Perp, PerpConfig, ScaleLoRA, mask_lora, scale_lora

RECIPE = Path(__file__).parents[3] / "recipes" / "perp.yaml"


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, reparameterization properties, a few steps,
    bit-identical resume, 2 processes equal to 1 (``test_two_processes_equal_one``, slow)."""

    name = "perp"
    plugin_config = {"r": 2, "alpha": 4}


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [n for n, _ in recipe.stages] == ["dense", "retrain"]
    assert [p.name for p in recipe.stages[1][1].plugins] == ["one-shot-pruning", "perp"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "lora"}, "method"),
        ({"r": 0}, "r"),
        ({"r": True}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"biases": "yes"}, "biases"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PerpConfig.{field}"):
        PerpConfig(**kwargs)


# -- by hand ----------------------------------------------------------------------------------------
def test_mask_lora_by_hand():
    # W = [[1, 0], [0, 2]] (pruned off-diagonal), r = 1, A = [[1, 2]], B = [[3], [4]]:
    # BA = [[3, 6], [4, 8]]; masked by 1[W ≠ 0]: [[3, 0], [0, 8]]; s = α/r = 2/1 = 2:
    # W' = [[1 + 6, 0], [0, 2 + 16]] = [[7, 0], [0, 18]].
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    assert torch.equal(mask_lora(w, a, b, 2.0), torch.tensor([[7.0, 0.0], [0.0, 18.0]]))
    # at init (B = 0) the layer is the pruned one, exactly
    m = MaskLoRA(w.shape, r=4, alpha=8)
    assert (
        m.scaling == 2.0 and torch.equal(m.lora_B, torch.zeros(2, 4)) and m.lora_A.shape == (4, 2)
    )
    assert torch.equal(m(w), w)


def test_scale_lora_by_hand():
    # r = 4: A = B = 1/√4 = 0.5 everywhere, BA = 4·0.25 = 1, so W' = W at init.
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s = ScaleLoRA(w.shape, r=4)
    assert torch.equal(s.lora_A, torch.full((4, 2), 0.5)) and torch.equal(s(w), w)
    # A = [[2, 3]], B = [[1], [-1]]: BA = [[2, 3], [-2, -3]]; W ⊙ BA = [[2, 0], [0, -6]].
    out = scale_lora(w, torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0], [-1.0]]))
    assert torch.equal(out, torch.tensor([[2.0, 0.0], [0.0, -6.0]]))


def test_conv_weights_are_viewed_as_out_by_fan_in():
    # Conv [out=2, in=1, 1, 2]: A [r, 2], B [2, r]; BA reshaped to the weight's shape.
    w = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 3.0]]]])
    out = mask_lora(w, torch.ones(1, 2), torch.tensor([[1.0], [2.0]]), 1.0)
    assert torch.equal(out, torch.tensor([[[[2.0, 0.0]]], [[[0.0, 5.0]]]]))


def _setup(net, **cfg):
    plugin = Perp(PerpConfig(**cfg))
    plugin.reparam_setup(module=SimpleNamespace(model=net), ctx=None)
    return plugin


def test_trainable_set_and_count_by_hand():
    # Linear(8, 6) → LayerNorm(6) → Linear(6, 3), r = 2. Biases 6 + 3, LN 6 + 6, MaskLoRA
    # A [2, 8] + B [6, 2] = 28 and A [2, 6] + B [3, 2] = 18: 9 + 12 + 46 = 67 trainable;
    # the weights (48 + 18) frozen.
    net = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    plugin = _setup(net, r=2, alpha=4)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {
        "0.bias",
        "1.weight",
        "1.bias",
        "3.bias",
        "0.parametrizations.weight.0.lora_A",
        "0.parametrizations.weight.0.lora_B",
        "3.parametrizations.weight.0.lora_A",
        "3.parametrizations.weight.0.lora_B",
    }
    assert plugin.trainable == 67
    # selective only: 9 + 12 = 21
    net2 = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    assert _setup(net2, method="none").trainable == 21
    # BatchNorm counts as a norm (PERP's ResNet experiments); biases can be switched off
    net3 = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert _setup(net3, method="none", biases=False).trainable == 8


def test_masked_entries_stay_zero_in_training_and_after_merge():
    """Both adapters on a pruned weight, the core's mask stacked on top as in a run: after
    AdamW steps the effective weight and the merged weight are zero where pruned, and the
    adapter alone (without the mask) is zero there as well."""
    torch.manual_seed(0)
    for method in ("mask_lora", "scale_lora"):
        net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))
        masks = pruning.add_masks(net)
        keep = pruning.global_allocation(
            pruning.magnitude_scores(pruning.local_weights(net, masks)), 0.75
        )
        pruning.set_masks(net, masks, keep)
        pruning.zero_pruned(net, masks)
        plain = merge(net).state_dict()
        net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))
        net.load_state_dict(plain)
        _setup(net, method=method, r=3, alpha=6)
        masks = pruning.add_masks(net)
        pruning.set_masks(net, masks, keep)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
        for _ in range(5):
            loss = net(torch.randn(16, 10)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, layer in pruning.prunable(net).items():
            adapter = layer.parametrizations.weight[0]
            assert bool((adapter(layer.parametrizations.weight.original)[~keep[k]] == 0).all())
            assert bool((layer.weight[~keep[k]] == 0).all())
            init = 0.0 if method == "mask_lora" else 3**-0.5  # B at init: 0, or 1/√r with r = 3
            assert not torch.equal(
                adapter.lora_B.detach(), torch.full_like(adapter.lora_B, init)
            )  # trained
        x = torch.randn(5, 10)
        before = net(x)
        merged = merge(net)
        assert not any(parametrize.is_parametrized(m) for m in merged.modules())
        for k, layer in pruning.prunable(merged).items():
            assert bool((layer.weight[~keep[k]] == 0).all())
            assert int((layer.weight != 0).sum()) <= int(keep[k].sum())
        torch.testing.assert_close(merged(x), before)


# -- staged runs ------------------------------------------------------------------------------------
STAGED = """
seed: 3
name: perp
model: {name: mlp, hidden: [24]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
trainer: {max_steps: 8, enable_progress_bar: false, limit_val_batches: 1.0}
stages:
  - name: dense
  - name: prune
    trainer: {max_steps: 4}
    plugins: [{name: one-shot-pruning, sparsity: 0.8, step: 0}, {name: uniform-allocation}]
  - name: retrain
    trainer: {max_steps: 10, checkpoint_every_n_steps: 5}
    optimizer: {name: adamw, lr: 0.01, weight_decay: 0.01}
    plugins: [{name: perp, r: 2, alpha: 4}]
"""

N_LAYERS = {"1": 64 * 24, "3": 24 * 10}


@pytest.fixture
def staged(tmp_path):
    path = tmp_path / "perp.yaml"
    path.write_text(STAGED + f"run_dir: {tmp_path}/runs\n")
    return path


def _masks(state):
    return {
        k.removeprefix("model.").split(".parametrizations")[0]: v
        for k, v in state.items()
        if k.endswith(".mask")
    }


@pytest.mark.parametrize("method", ["mask_lora", "scale_lora"])
def test_staged_prune_then_perp_keeps_the_sparsity_exactly(staged, method):
    built, metrics = fit(load_recipe(staged, [f"stages.2.plugins.0.method={method}"]))
    run = built.run_dir / "stages"
    pruned = load_checkpoint(run / "1-prune")["state_dict"]
    end = load_checkpoint(run / "2-retrain")["state_dict"]
    m0, m1 = _masks(pruned), _masks(end)
    assert set(m1) == set(N_LAYERS) and all(
        torch.equal(m0[k], m1[k]) for k in m0
    )  # carried unchanged
    for k, n in N_LAYERS.items():  # uniform allocation: round(0.8·n) per layer, exactly
        assert int((~m1[k]).sum()) == round(0.8 * n)
    assert metrics["pruning/sparsity"] == pytest.approx(
        round(0.8 * 1536) / 1776 + round(0.8 * 240) / 1776
    )
    # the stored weights are frozen (equal to the carried ones), the adapters trained; the
    # merged effective weight is zero where pruned
    for k in N_LAYERS:
        stored = end[f"model.{k}.parametrizations.weight.original"]
        assert torch.equal(stored, pruned[f"model.{k}.parametrizations.weight.original"] * m0[k])
        a, b = (
            end[f"model.{k}.parametrizations.weight.0.lora_A"],
            end[f"model.{k}.parametrizations.weight.0.lora_B"],
        )
        eff = mask_lora(stored, a, b, 2.0) if method == "mask_lora" else scale_lora(stored, a, b)
        assert bool((eff[~m1[k]] == 0).all()) and not torch.equal(eff, stored)
    # 24 + 10 biases; A [2, 64] + B [24, 2] + A [2, 24] + B [10, 2] = 128 + 48 + 48 + 20 = 244
    assert metrics["perp/trainable"] == 278 and metrics["model/trainable_parameters"] == 278


@pytest.mark.parametrize(
    "ckpt", ["2-retrain/checkpoints/step5.ckpt", "1-prune/checkpoints/last.ckpt"]
)
def test_resume_inside_perp_and_between_stages_is_bit_identical(staged, ckpt):
    full, _ = fit(load_recipe(staged, ["name=full"]))
    resumed, _ = fit(
        load_recipe(staged, ["name=resumed"]), resume=str(full.run_dir / "stages" / ckpt)
    )
    a = load_checkpoint(full.run_dir / "stages" / "2-retrain")["state_dict"]
    b = load_checkpoint(resumed.run_dir / "stages" / "2-retrain")["state_dict"]
    assert_states_close(a, b, atol=0)


@pytest.mark.slow
def test_two_processes_run_prune_and_perp_as_one_process(staged, tmp_path):
    """2 DDP processes on halves of the global batch: identical masks, weights and adapters
    equal to 1 process."""
    one = fit_cli(staged, ["name=one"], cwd=tmp_path)
    two = fit_cli(staged, ["name=two", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
    for stage in ("1-prune", "2-retrain"):
        a = load_checkpoint(one / "stages" / stage)["state_dict"]
        b = load_checkpoint(two / "stages" / stage)["state_dict"]
        assert_states_close(a, b, atol=1e-6, rtol=1e-5)
        assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".mask"))
