"""The srat plugin's hooks: the deferred switch, global class counts, the separability term."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from paperhooks.context import StepContext
from paperhooks.functional import Hooks
from paperhooks.module import HookedModule
from paperhooks_srat import SRAT, TERM, SRATConfig, batch_hard_triplet, class_weights


def plugin(**kw) -> SRAT:
    p = SRAT(SRATConfig(**{"switch_unit": "step", "switch_at": 1, **kw}))
    p.name = "srat"
    return p


def weights(p: SRAT, y: list[int], step: int, epoch: int = 0, losses: torch.Tensor | None = None):
    y_t = torch.tensor(y)
    losses = torch.ones(len(y)) if losses is None else losses
    return p.weighting_sample_weights(
        losses=losses, batch={"target": y_t}, ctx=StepContext(step=step, epoch=epoch)
    )


# -- config ------------------------------------------------------------------------------------
def test_config_defaults():
    c = SRATConfig()
    assert (c.weighting, c.beta, c.switch_at, c.switch_unit) == ("inverse", 0.9999, 160, "epoch")
    assert (c.sep_weight, c.margin, c.normalize) == (1.0, 0.2, True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weighting": "sqrt"}, "weighting"),
        ({"switch_unit": "epochs"}, "switch_unit"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"sep_weight": -1.0}, "sep_weight"),
        ({"sep_weight": math.nan}, "sep_weight"),
        ({"margin": -0.2}, "margin"),
        ({"margin": True}, "margin"),
        ({"switch_at": -1}, "switch_at"),
        ({"switch_at": 2.5}, "switch_at"),
        ({"normalize": 1}, "normalize"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SRATConfig.{field}"):
        SRATConfig(**kwargs)


def test_metadata_marks_the_reconstruction_unverified():
    assert SRAT.family == "sample-weighting" and SRAT.extra_families == ("objective",)
    assert SRAT.paper.verified is False and SRAT.paper.arxiv == "2107.13639"
    (ep,) = [e for e in importlib.metadata.entry_points(group="paperhooks") if e.name == "srat"]
    assert ep.load() is SRAT


# -- class weights: counts, switch, state ------------------------------------------------------------
def test_weights_switch_on_late_and_use_the_counts_of_earlier_steps():
    p = plugin(switch_at=1)
    # step 0: before the switch; counts [3, 1]
    assert weights(p, [0, 0, 0, 1], step=0) is None
    assert_close(p.counts, torch.tensor([3.0, 1.0], dtype=torch.float64))
    # step 1: weights from [3, 1]: 1/n = [1/3, 1] → ×2/(4/3) = [0.5, 1.5]; then counts [4, 2]
    assert_close(weights(p, [0, 1], step=1), torch.tensor([0.5, 1.5]))
    assert_close(p.counts, torch.tensor([4.0, 2.0], dtype=torch.float64))
    # epoch 1: counting has stopped; weights from [4, 2]: [1/4, 1/2] → ×2/(3/4) = [2/3, 4/3]
    assert_close(weights(p, [1, 0, 1], step=7, epoch=1), torch.tensor([4 / 3, 2 / 3, 4 / 3]))
    assert_close(p.counts, torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_epoch_switch_compares_the_epoch():
    p = plugin(switch_unit="epoch", switch_at=2)
    assert weights(p, [0, 1], step=500, epoch=1) is None
    assert weights(p, [0, 1], step=0, epoch=2) is not None


def test_new_classes_grow_the_counts_and_unseen_classes_count_one():
    p = plugin(switch_at=0)
    # counts empty: every class counts as 1 → uniform
    assert_close(weights(p, [0, 2], step=0), torch.ones(2))
    assert_close(p.counts, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    # counts [1, 0, 1] → n = [1, 1, 1] (class 1 floored); class 4 is new: n = [1, 1, 1, 1, 1] → uniform
    assert_close(weights(p, [4, 1], step=1), torch.ones(2))
    assert_close(p.counts, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64))


def test_weights_do_not_read_the_losses_and_zero_or_equal_losses_are_fine():
    a, b = plugin(switch_at=0), plugin(switch_at=0)
    for p in (a, b):
        weights(p, [0, 0, 0, 1], step=0)
    wa = weights(a, [0, 1, 1], step=1, losses=torch.zeros(3))
    wb = weights(b, [0, 1, 1], step=1, losses=torch.full((3,), 2.5))
    assert_close(wa, wb)
    assert_close(
        wa, torch.tensor([0.5, 1.5, 1.5])
    )  # counts [3, 1]: [1/3, 1] → ×2/(4/3) = [0.5, 1.5]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_raise_naming_the_plugin(bad):
    with pytest.raises(ValueError, match="srat: 1 per-sample losses"):
        weights(plugin(), [0, 1, 1], step=5, losses=torch.tensor([1.0, bad, 0.5]))


def test_bad_labels_raise_naming_the_plugin():
    p = plugin()
    with pytest.raises(ValueError, match="srat: needs batch"):
        p.weighting_sample_weights(
            losses=torch.ones(2), batch={"target": torch.ones(2)}, ctx=StepContext()
        )
    with pytest.raises(ValueError, match="srat: class labels must be >= 0"):
        weights(p, [0, -1], step=0)


def test_state_round_trips_and_restores_the_weights():
    p = plugin(switch_at=0)
    weights(p, [0, 0, 1, 2, 2, 2], step=0)
    q = plugin(switch_at=0)
    q.load_state_dict(p.state_dict())
    assert_close(weights(q, [2, 0], step=3, epoch=1), weights(p, [2, 0], step=3, epoch=1))
    state = p.state_dict()
    state["counts"][0] = 99.0  # a copy: changing it leaves the plugin alone
    assert p.counts[0] == 2.0


# -- the separability objective ------------------------------------------------------------------
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _batch(n: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 6, generator=g), "target": torch.arange(n) % 3}


def test_features_are_the_input_of_the_last_linear_layer():
    model, batch = _mlp(), _batch()
    module = HookedModule(model)
    p = plugin()
    p.lifecycle_setup(module=module)
    outputs = module.outputs(batch)
    terms = p.objective_terms(module=module, batch=batch, outputs=outputs, ctx=StepContext(step=0))
    z = model[1](model[0](batch["input"]))  # [9, 5]: ReLU output, what the head reads
    assert_close(terms[TERM].detach(), batch_hard_triplet(z, batch["target"], 0.2).detach())
    # captured features are used once; without a new forward pass the plugin runs one itself
    again = p.objective_terms(module=module, batch=batch, outputs=outputs, ctx=StepContext(step=0))
    assert_close(again[TERM], terms[TERM])


def test_unwatched_module_gets_its_features_from_one_extra_forward_pass():
    model, batch = _mlp(), _batch()
    module = HookedModule(model)
    p = plugin()  # no lifecycle_setup: the plugin watches the model on first use
    terms = p.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=StepContext()
    )
    z = model[1](model[0](batch["input"]))
    assert_close(terms[TERM].detach(), batch_hard_triplet(z, batch["target"], 0.2).detach())
    terms[TERM].sum().backward()
    assert model[0].weight.grad is not None and bool(model[0].weight.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="srat: no features"):
        p.objective_terms(module=None, batch=batch, outputs={}, ctx=StepContext())


def test_outputs_features_take_precedence_and_row_counts_are_checked():
    p = plugin(sep_weight=2.0)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    batch = {"target": torch.tensor([0, 0, 1, 1])}
    terms = p.objective_terms(module=None, batch=batch, outputs={"features": z}, ctx=StepContext())
    assert_close(terms[TERM], 2.0 * batch_hard_triplet(z, batch["target"]))
    with pytest.raises(ValueError, match="srat: features have 3 rows but the batch has 4"):
        p.objective_terms(module=None, batch=batch, outputs={"features": z[:3]}, ctx=StepContext())


def test_sep_weight_zero_adds_no_term():
    assert (
        plugin(sep_weight=0.0).objective_terms(
            module=None, batch=_batch(), outputs={}, ctx=StepContext()
        )
        is None
    )


def test_after_the_switch_ce_is_class_weighted_and_separability_is_a_plain_mean():
    # Through the core's own reduction (Hooks): loss = Σ w CE/Σ w + λ (1/N) Σ ℓ, value and gradient.
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, 4, generator=g, requires_grad=True)
    head = nn.Linear(4, 3)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    batch = {"target": y}
    p = plugin(switch_at=1, sep_weight=0.5, margin=1.0)
    p.counts = torch.tensor([50.0, 20.0, 5.0], dtype=torch.float64)
    hooks = Hooks([p])
    hooks.begin_step(step=3, epoch=1)  # counting is over: the counts stay [50, 20, 5]
    logits = head(z)
    ce = F.cross_entropy(logits, y, reduction="none")
    objectives = hooks.objectives(None, batch, {"logits": logits, "features": z}, ce)
    w = hooks.sample_weights(sum(objectives.values()), batch)
    reduced = hooks.reduce(objectives, w)
    cw = class_weights(p.counts).float()[y]
    ell = batch_hard_triplet(z, y, 1.0)
    assert_close(w, cw)
    assert_close(reduced["loss"], (cw * ce).sum() / cw.sum())
    assert_close(reduced[TERM], 0.5 * ell.mean())
    (got,) = torch.autograd.grad(reduced[TERM], z, retain_graph=True)
    (expected,) = torch.autograd.grad(0.5 * ell.mean(), z)
    assert_close(got, expected)
