"""Tests of the pgd plugin's hooks, config and metric, outside training."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from paperhooks import HookedModule
from paperhooks.context import StepContext
from paperhooks_pgd import PGD, PGDConfig, linf_pgd, task_losses


def digit_like_batch(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input": torch.rand(n, 1, 4, 4, generator=g),
        "target": torch.randint(3, (n,), generator=g),
        "index": torch.arange(n),
    }


def mlp_module(seed: int = 0, norm: bool = False, dropout: float = 0.0) -> HookedModule:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, 32)]
    if norm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3)]
    return HookedModule(nn.Sequential(*layers))


def plugin(**kwargs) -> PGD:
    p = PGD(PGDConfig(**{"epsilon": 0.2, "step_size": 0.05, "steps": 5, **kwargs}))
    return p


# -- the hook --------------------------------------------------------------------------------
def test_hook_returns_the_pgd_example_of_the_modules_own_loss():
    module, batch = mlp_module(), digit_like_batch()
    ctx = StepContext(seed=1, step=7)
    out = plugin(random_start=False).perturb_inputs(batch=batch, module=module, ctx=ctx)
    expected = linf_pgd(
        lambda xa: task_losses(module, {**batch, "input": xa}), batch["input"], 0.2, 0.05, 5
    )
    assert_close(out["input"], expected, atol=0, rtol=0)
    assert out["target"] is batch["target"] and out["index"] is batch["index"]
    # logged global means show the attack at work: the loss at x^{K−1} exceeds the clean one
    assert ctx.logged["pgd/loss_last"] > ctx.logged["pgd/loss_start"] > 0


def test_random_start_comes_from_the_step_generator():
    module, batch = mlp_module(), digit_like_batch()
    p = plugin()
    a = p.perturb_inputs(batch=batch, module=module, ctx=StepContext(seed=1, step=7))["input"]
    b = p.perturb_inputs(batch=batch, module=module, ctx=StepContext(seed=1, step=7))["input"]
    c = p.perturb_inputs(batch=batch, module=module, ctx=StepContext(seed=1, step=8))["input"]
    d = p.perturb_inputs(batch=batch, module=module, ctx=StepContext(seed=1, step=7, batch_idx=1))[
        "input"
    ]
    assert torch.equal(a, b)  # same seed and step: identical (all ranks, and on resume)
    assert not torch.equal(a, c) and not torch.equal(a, d)  # a new step or micro-batch: a new start
    # and it does not touch the global RNG
    torch.manual_seed(0)
    before = torch.get_rng_state()
    p.perturb_inputs(batch=batch, module=module, ctx=StepContext(seed=1, step=7))
    assert torch.equal(before, torch.get_rng_state())


def test_backward_passes_run_inside_no_sync_and_leave_no_parameter_gradient():
    active = {"no_sync": False}
    seen: list[bool] = []  # per backward pass through the model: was no_sync active?

    @contextlib.contextmanager
    def fake_no_sync():
        active["no_sync"] = True
        try:
            yield
        finally:
            active["no_sync"] = False

    module, batch = mlp_module(), digit_like_batch()
    module.model.register_full_backward_hook(lambda *_: seen.append(active["no_sync"]))
    ctx = StepContext(step=3)
    ctx._no_sync = fake_no_sync  # what the core sets to DDP's no_sync
    plugin(steps=4).perturb_inputs(batch=batch, module=module, ctx=ctx)
    assert seen == [True] * 4  # one input-gradient pass per PGD step, all without DDP sync
    assert all(p.grad is None for p in module.parameters())


def test_train_mode_attacks_with_batch_statistics_as_the_official_code():
    # The official training attacks Model(mode='train'): batch norm normalizes with the batch's
    # statistics and, with updates_collections=None, its moving averages move at every
    # forward pass of the attack too. torch's BatchNorm in train mode does the same.
    module, batch = mlp_module(norm=True), digit_like_batch()
    module.train()
    bn = module.model[2]
    plugin(attack_mode="train", steps=3).perturb_inputs(
        batch=batch, module=module, ctx=StepContext()
    )
    assert int(bn.num_batches_tracked) == 3  # one update per attack step
    assert module.training and bn.training


def test_eval_mode_freezes_batch_norm_and_restores_each_submodules_mode():
    module, batch = mlp_module(norm=True, dropout=0.5), digit_like_batch()
    module.train()
    module.model[4].eval()  # a submodule the user keeps in eval mode must stay so
    bn = module.model[2]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    rng = torch.get_rng_state()
    out = plugin(attack_mode="eval", random_start=False).perturb_inputs(
        batch=batch, module=module, ctx=StepContext()
    )
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(stats[0], bn.running_mean) and torch.equal(stats[1], bn.running_var)
    assert torch.equal(rng, torch.get_rng_state())  # no dropout mask was drawn
    assert [m.training for m in module.model] == [True, True, True, True, False, True]
    # the same as attacking a copy of the model in eval mode
    module.eval()
    expected = linf_pgd(
        lambda xa: task_losses(module, {**batch, "input": xa}), batch["input"], 0.2, 0.05, 5
    )
    assert_close(out["input"], expected, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_or_losses_raise_naming_the_plugin(bad):
    module, batch = mlp_module(), digit_like_batch()
    batch["input"][3, 0, 1, 1] = bad
    with pytest.raises(ValueError, match="pgd: the attack met a NaN/inf loss or input"):
        plugin().perturb_inputs(batch=batch, module=module, ctx=StepContext())


def test_integer_inputs_are_refused_naming_the_plugin():
    batch = {"input": torch.randint(5, (4, 3)), "target": torch.zeros(4, dtype=torch.int64)}
    with pytest.raises(TypeError, match="pgd: PGD perturbs a floating-point"):
        plugin().perturb_inputs(batch=batch, module=mlp_module(), ctx=StepContext())


def test_task_losses_sums_a_mapping_of_losses():
    class Two(HookedModule):
        def losses(self, batch, outputs):
            ce = nn.functional.cross_entropy(outputs["logits"], batch["target"], reduction="none")
            return {"ce": ce, "twice": 2 * ce}

    module, batch = Two(mlp_module().model), digit_like_batch()
    base = HookedModule(module.model)
    assert_close(task_losses(module, batch), 3 * task_losses(base, batch))


# -- the validation metric -------------------------------------------------------------------
class Threshold(nn.Module):
    """1-D inputs; logits [0, 10(x − 0.5)]: class 1 iff x > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 10 * (x.reshape(-1) - 0.5)
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize(
    ("name", "expected"), [("robust_acc", 0.75), ("worst_class_robust_acc", 2 / 3)]
)
def test_robust_metrics_by_hand(name, expected):
    # x = [0.1, 0.3, 0.45, 0.9], y = [0, 0, 0, 1], ε = 0.1: a sample stays correct iff it is
    # more than ε from the threshold 0.5 on its side: [yes, yes, no (0.45 → 0.55), yes].
    # Accuracy 3/4; class 0: 2/3, class 1: 1/1 → worst class 2/3.
    module = HookedModule(Threshold())
    p = PGD(PGDConfig(epsilon=0.1, step_size=0.03, steps=10, val_metrics=(name,)))
    (metric,) = p.metric_build(module=module, ctx=StepContext(seed=0)).values()
    x, y = torch.tensor([[0.1], [0.3], [0.45], [0.9]]), torch.tensor([0, 0, 0, 1])
    with torch.inference_mode():  # as Lightning validates
        metric.update({}, {"input": x[:2], "target": y[:2]})
        metric.update({}, {"input": x[2:], "target": y[2:]})
    assert metric.compute().item() == pytest.approx(expected)
    metric.reset()
    assert metric.calls == 0


def test_metric_build_names_the_asked_metrics_only():
    module = HookedModule(Threshold())
    assert PGD().metric_build(module=module, ctx=StepContext()) == {}
    both = PGD(PGDConfig(val_metrics=("robust_acc", "worst_class_robust_acc"))).metric_build(
        module=module, ctx=StepContext()
    )
    assert sorted(both) == ["pgd/robust_acc", "pgd/worst_class_robust_acc"]


# -- config and metadata ---------------------------------------------------------------------
def test_config_defaults_are_the_official_mnist_ones():
    cfg = PGDConfig()
    assert (cfg.epsilon, cfg.step_size, cfg.steps, cfg.random_start, cfg.bounds) == (
        0.3,
        0.01,
        40,
        True,
        (0.0, 1.0),
    )
    assert cfg.attack_mode == "train"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": "0.1"}, "epsilon"),
        ({"step_size": 0}, "step_size"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"val_steps": 0}, "val_steps"),
        ({"random_start": 1}, "random_start"),
        ({"bounds": (1.0, 0.0)}, "bounds"),
        ({"bounds": (0.0, math.nan)}, "bounds"),
        ({"attack_mode": "test"}, "attack_mode"),
        ({"val_metrics": ("accuracy",)}, "val_metrics"),
        ({"val_metrics": ("robust_acc", "robust_acc")}, "val_metrics"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PGDConfig.{field}"):
        PGDConfig(**kwargs)


def test_plugin_metadata_and_entry_point():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="paperhooks") if ep.name == "pgd"]
    assert ep.load() is PGD
    assert PGD.family == "input-perturbation" and PGD.extra_families == ("metric",)
    assert PGD.paper.arxiv == "1706.06083" and PGD.paper.verified
    assert "pgd_attack.py" in PGD.paper.checked_against
    assert PGD().state_dict() == {}
