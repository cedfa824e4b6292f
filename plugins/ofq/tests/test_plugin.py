"""The ``ofq`` plugin: conformance kit, CGA's freeze-and-restore, merge, checkpoints, FSDP2, effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import recipe as R
from paperhooks.context import StepContext
from paperhooks.reparam import Layers, merge, trainable_parameters
from paperhooks.run import fit
from paperhooks.tasks import build_datamodule
from paperhooks.tasks.registry import build_model
from paperhooks.testing import load_checkpoint
from paperhooks.testing.conformance import PluginConformance, check_ddp_equals_single, tiny_recipe
from paperhooks_ofq import Ofq, OfqConfig, statsq_scale

RECIPE = Path(__file__).parents[3] / "recipes" / "ofq.yaml"
#: CGA over the last 5 steps: inside the kit's 6-step DDP run and across its resume at step 13 of 16
KIT = {"cga_steps": 5}


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, reparameterization properties, a few steps,
    bit-identical resume (from inside the CGA phase), 2 DDP processes equal 1 (slow)."""

    name = "ofq"
    plugin_config = KIT


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process_on_the_global_batch(tmp_path):
    check_ddp_equals_single("ofq", KIT, tmp_path, strategy="fsdp2")


class Holder:
    """What the reparameterization hooks read of the HookedModule."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def _plugin(**kw) -> Ofq:
    p = Ofq(OfqConfig(**kw))
    p.name = "ofq"
    return p


def test_recipe_file_validates():
    recipe = R.load(RECIPE)
    assert [p.name for p in recipe.plugins] == ["ofq"]
    assert recipe.plugins[0].config == OfqConfig(cga_epochs=5, layers=Layers(types=("Linear",)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"boundary_range": 0.5}, "boundary_range"),
        ({"boundary_range": -0.1}, "boundary_range"),
        ({"cga_epochs": -1}, "cga_epochs"),
        ({"cga_steps": -2}, "cga_steps"),
        ({"momentum": 0.0}, "momentum"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"OfqConfig.{field}"):
        OfqConfig(**kwargs)


def test_the_annealing_phase_is_the_last_epochs_or_steps():
    p = _plugin(cga_epochs=2)
    assert [p.annealing(StepContext(epoch=e, max_epochs=5, max_steps=50)) for e in range(5)] == [
        False
    ] * 3 + [True] * 2
    assert not p.annealing(StepContext(epoch=4, max_epochs=5, max_steps=None))  # outside a fit
    s = _plugin(cga_steps=3)
    assert [s.annealing(StepContext(step=t, max_steps=10)) for t in (6, 7, 9)] == [
        False,
        True,
        True,
    ]
    assert not _plugin(cga_epochs=0).annealing(StepContext(epoch=4, max_epochs=5, max_steps=50))
    with pytest.raises(ValueError, match="cga_epochs = 2 needs trainer.max_epochs.*set cga_steps"):
        p.annealing(StepContext(epoch=0, max_epochs=-1, max_steps=50))


def _tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def test_cga_zeroes_the_gradient_of_frozen_weights_and_restores_them_after_the_step():
    # step 0 plain StatsQ (fills the momentum buffers); step 1 annealed: SGD with momentum and
    # weight decay would move every weight, so frozen ones must be put back (cga.py restores).
    model = _tiny()
    plugin = _plugin(cga_steps=1)
    ctx = StepContext(max_steps=2)
    plugin.reparam_setup(module=Holder(model), ctx=ctx)
    assert [n for n, m in model.named_modules() if parametrize.is_parametrized(m)] == ["0", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(32, 8), torch.randint(4, (32,))
    stored = {k: model[int(k)].parametrizations.weight.original for k in ("0", "2")}
    for step in range(2):
        ctx.step = step
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        quantizers = {k: model[int(k)].parametrizations.weight[0] for k in stored}
        before = {k: w.detach().clone() for k, w in stored.items()}
        if step == 1:
            for k, q in quantizers.items():
                assert q.anneal and q.frozen is not None and 0.5 < q.frozen.float().mean() < 1
                assert torch.equal(stored[k].grad[q.frozen], torch.zeros(int(q.frozen.sum())))
                assert bool((stored[k].grad[~q.frozen] != 0).any())
            frozen = {k: q.frozen.clone() for k, q in quantizers.items()}
        opt.step()
        ctx.step = step + 1
        plugin.reparam_after_step(module=Holder(model), ctx=ctx)
    for k, w in stored.items():
        assert torch.equal(w.detach()[frozen[k]], before[k][frozen[k]])  # restored exactly
        assert not torch.equal(w.detach()[~frozen[k]], before[k][~frozen[k]])  # trained
        assert quantizers[k].frozen is None  # released after the restore
    assert ctx.logged["ofq/frozen_fraction"] > 0.5


def test_ofq_refuses_to_act_on_another_reparameterization_output():
    model = _tiny()
    parametrize.register_parametrization(model[2], "weight", nn.Identity())
    with pytest.raises(
        ValueError, match="layer '2' already has a reparameterization; put ofq first"
    ):
        _plugin().reparam_setup(module=Holder(model), ctx=StepContext())


def test_merge_bakes_the_quantized_weights_and_keeps_the_function():
    model = _tiny(1)
    plugin = _plugin(bits=2, cga_steps=1)
    plugin.reparam_setup(module=Holder(model), ctx=StepContext(step=5, max_steps=5))
    n_before = trainable_parameters(model)
    scales = {i: statsq_scale(model[i].parametrizations.weight.original) for i in (0, 2)}
    x = torch.randn(10, 8)
    model.train()
    out = model(x)  # annealing: the forward value is still W_q
    model.eval()
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    merged = merge(model, [plugin])
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert not merged._forward_pre_hooks  # the plugin's CGA switch is gone
    torch.testing.assert_close(merged(x), out, rtol=0, atol=0)
    for i, s in scales.items():
        # W_q = s·(q + 0.5)/n with n = 2: 2·W_q/s = q + 0.5 ∈ {−1.5, −0.5, 0.5, 1.5}, row by row
        levels = {round(v, 4) for v in (2 * merged[i].weight.detach() / s).flatten().tolist()}
        assert levels <= {-1.5, -0.5, 0.5, 1.5}, levels
    assert n_before == trainable_parameters(merged)  # StatsQ adds no parameter


def test_checkpoint_keys_are_stable_and_load_with_weights_only(tmp_path):
    raw = tiny_recipe(
        [{"name": "ofq", **KIT}], run_dir=tmp_path, trainer={"max_steps": 3, "limit_val_batches": 0}
    )
    built, metrics = fit(R.validate(raw))
    ckpt = load_checkpoint(built.run_dir)  # weights_only=True
    assert sorted(ckpt["state_dict"]) == [
        "model.1.bias",
        "model.1.parametrizations.weight.original",
        "model.4.bias",
        "model.4.weight",
    ]
    (entry,) = ckpt["paperhooks"]["plugins"]
    state = entry["state"]
    assert entry["name"] == "ofq" and sorted(state) == ["flips", "oscillations", "tracks"]
    assert sorted(state["tracks"]) == ["1"] and sorted(state["tracks"]["1"]) == [
        "codes",
        "direction",
        "ema",
    ]
    track = state["tracks"]["1"]
    assert (track["codes"].dtype, track["direction"].dtype, track["ema"].dtype) == (
        torch.int8,
        torch.int8,
        torch.float32,
    )
    assert track["codes"].shape == (16, 64)
    assert metrics["model/trainable_parameters"] == 64 * 16 + 16 + 16 * 10 + 10  # StatsQ adds none
    assert {"ofq/oscillations", "ofq/flips", "ofq/oscillation_ema", "ofq/frozen_fraction"} <= set(
        metrics
    )


# -- the paper's effect --------------------------------------------------------------------------------
def _train(
    seed: int, cga_epochs: int, *, epochs: int = 15, batch: int = 128, lr: float = 0.05
) -> tuple[float, list[int]]:
    """2-bit QAT of a digits MLP (64-64 hidden, both hidden layers quantized, head in full
    precision), SGD lr 0.05 momentum 0.9 at a constant rate; the hooks called in the core's
    order. Returns the validation accuracy and the oscillations counted in each epoch."""
    data = build_datamodule("digits", {"batch_size": batch}, seed=seed)
    train, val = data.train_set.tensors, data.val_set.tensors
    torch.manual_seed(seed)
    model = build_model("mlp", {"hidden": [64, 64]}, data.info)
    per_epoch = len(train["target"]) // batch
    ctx = StepContext(seed=seed, max_steps=epochs * per_epoch, max_epochs=epochs)
    plugin = _plugin(bits=2, cga_epochs=cga_epochs, layers=Layers(types=("Linear",)))
    plugin.reparam_setup(module=Holder(model), ctx=ctx)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    counts = []
    model.train()
    for epoch in range(epochs):
        order, start = torch.randperm(len(train["target"]), generator=g), plugin.oscillations
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            ctx.epoch = epoch
            opt.zero_grad()
            F.cross_entropy(model(train["input"][idx]), train["target"][idx]).backward()
            opt.step()
            ctx.step += 1
            plugin.reparam_after_step(module=Holder(model), ctx=ctx)
        counts.append(plugin.oscillations - start)
    model.eval()
    with torch.no_grad():
        acc = (model(val["input"]).argmax(1) == val["target"]).float().mean().item()
    return acc, counts


def test_cga_calms_the_oscillations_of_the_last_epochs():
    """§4.2's claim, in direction: with CGA over the last 3 of 15 epochs, far fewer integer
    codes oscillate in those epochs than with StatsQ alone, on every seed.

    Measured (torch 2.14.1, CPU), oscillations in the last 3 epochs, StatsQ alone → with CGA:
    seed 0: 478 → 29, seed 1: 457 → 30, seed 2: 349 → 24; validation accuracy 0.947 → 0.933,
    0.961 → 0.958, 0.942 → 0.944 (no accuracy claim is asserted: see the method card).
    """
    for seed in range(3):
        acc0, plain = _train(seed, cga_epochs=0)
        acc1, annealed = _train(seed, cga_epochs=3)
        assert plain[:12] == annealed[:12]  # the same run until CGA starts
        assert sum(annealed[-3:]) < 0.2 * sum(plain[-3:]), (seed, plain, annealed)
        assert acc0 > 0.85 and acc1 > 0.85, (seed, acc0, acc1)  # both trained
