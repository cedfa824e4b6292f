"""The plugin on small models: the trainable set, AdamW, the penalty, re-selection, merge, state."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.reparam import Layers, merge, trainable_parameters
from paperhooks_sara import Sara, SaraConfig, nuclear_norm

RECIPE = Path(__file__).parents[3] / "recipes" / "sara.yaml"


class Holder:
    """What the hooks read of a HookedModule: ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def sara(model: nn.Module, **config) -> Sara:
    plugin = Sara(SaraConfig(**config))
    plugin.name = "sara"
    plugin.reparam_setup(module=Holder(model), ctx=StepContext(seed=0))
    return plugin


def data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 6, generator=g), torch.randint(3, (n,), generator=g)


def train(
    model: nn.Module, plugin: Sara, steps: int, lr: float = 0.05, weight_decay: float = 0.1
) -> None:
    """The core's step order: loss (+ the plugin's terms), AdamW step, then reparam_after_step."""
    x, y = data()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    ctx = StepContext(seed=0)
    for step in range(steps):
        ctx.step = step
        loss = nn.functional.cross_entropy(model(x), y)
        terms = plugin.objective_terms(
            module=Holder(model), batch={"target": y}, outputs={}, ctx=ctx
        )
        if terms:
            loss = loss + terms["sara_rank"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.step = step + 1
        plugin.reparam_after_step(module=Holder(model), ctx=ctx)


def effective(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for m in (model[0], model[2], model[4]) for t in (m.weight, m.bias)]


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["sara"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"trainable_fraction": 1.0}, "trainable_fraction"),
        ({"progressive_iter": -2}, "progressive_iter"),
        ({"lambda_rank": -1e-4}, "lambda_rank"),
        ({"rank_min_dim": -1}, "rank_min_dim"),
        ({"freeze_others": "yes"}, "freeze_others"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SaraConfig.{field}"):
        SaraConfig(**kwargs)


def test_the_trainable_set_is_the_entries_below_the_threshold():
    model = mlp()
    before = effective(model)
    plugin = sara(model, threshold=0.05)
    x, _ = data()
    for layer, w in zip((model[0], model[2], model[4]), before[::2], strict=True):
        part = layer.parametrizations.weight[0]
        assert torch.equal(part.mask, w.abs() < 0.05)
    trainable, total = plugin.trainable()
    assert total == (6 * 12 + 12) + (12 * 10 + 10) + (10 * 3 + 3)
    assert trainable == sum(int((t.abs() < 0.05).sum()) for t in before)
    # registering changes nothing: the function and the parameter shapes are the model's
    assert_close(effective(model), before)
    assert trainable_parameters(model) == total  # full-size tensors (DDP's set is fixed)
    assert model(x).shape == (20, 3)


def test_a_fraction_sets_a_global_quantile_threshold():
    model = mlp()
    plugin = sara(model, trainable_fraction=0.1)
    trainable, total = plugin.trainable()
    assert trainable == int(0.1 * total)  # no ties among random floats


def test_adamw_with_weight_decay_moves_only_the_trainable_entries():
    model = mlp()
    before = effective(model)
    plugin = sara(model, trainable_fraction=0.2, progressive_iter=-1, lambda_rank=0.0)
    masks = [
        m.parametrizations[t][0].mask.clone()
        for m in (model[0], model[2], model[4])
        for t in ("weight", "bias")
    ]
    # large lr and decoupled weight decay 0.1: a plain AdamW would move every entry
    train(model, plugin, steps=5)
    after = effective(model)
    for b, a, m in zip(before, after, masks, strict=True):
        assert torch.equal(a[~m], b[~m])  # frozen entries bit-identical
        assert bool((a[m] != b[m]).all())  # every trainable entry moved


def test_other_parameters_are_frozen_unless_asked_otherwise():
    model = mlp()
    sara(model, layers=Layers(types=("Linear",), skip_head=True))
    assert not any(p.requires_grad for p in model[4].parameters())
    model = mlp()
    sara(model, layers=Layers(types=("Linear",), skip_head=True), freeze_others=False)
    assert all(p.requires_grad for p in model[4].parameters()) and not parametrize.is_parametrized(
        model[4]
    )


def test_the_nuclear_norm_term_is_lambda_times_the_masked_weights_nuclear_norm():
    model = mlp()
    # 2-D weights with both sides above 8: 12 × 6 no (6), 10 × 12 yes, 3 × 10 no
    plugin = sara(
        model, trainable_fraction=0.3, rank_min_dim=8, rank_min_entries=0, lambda_rank=0.5
    )
    ((layer, part),) = plugin.candidates()
    assert layer is model[2]
    _, y = data()
    terms = plugin.objective_terms(
        module=Holder(model), batch={"target": y}, outputs={}, ctx=StepContext(seed=0, step=3)
    )
    want = 0.5 * nuclear_norm(model[2].weight * part.mask)
    assert terms["sara_rank"].shape == (20,)
    assert_close(terms["sara_rank"], want.expand(20))
    # its gradient reaches only the trainable entries of that weight
    terms["sara_rank"].mean().backward()
    grad = model[2].parametrizations.weight.original.grad
    assert bool((grad[~part.mask] == 0).all()) and bool((grad[part.mask] != 0).any())
    assert model[0].parametrizations.weight.original.grad is None


def test_the_penalized_layer_is_drawn_per_step_identically_on_every_rank():
    def picks(plugin, model):
        out = []
        for step in range(12):
            t = plugin.objective_terms(
                module=Holder(model),
                batch={"target": torch.zeros(2)},
                outputs={},
                ctx=StepContext(seed=4, step=step),
            )
            out.append(round(float(t["sara_rank"][0].detach()), 6))
        return out

    wide = dict(trainable_fraction=0.3, rank_min_dim=2, rank_min_entries=0)
    a_model, b_model = mlp(), mlp()
    a, b = sara(a_model, **wide), sara(b_model, **wide)  # two "ranks" with identical weights
    assert len(a.candidates()) == 3
    assert picks(a, a_model) == picks(b, b_model)
    assert len(set(picks(a, a_model))) == 3  # all three weights get drawn over 12 steps


def test_no_penalty_below_the_minimum_trainable_entries_or_without_candidates():
    model = mlp()
    assert (
        sara(model, rank_min_dim=64).objective_terms(
            module=None, batch={"target": torch.zeros(2)}, outputs={}, ctx=StepContext()
        )
        is None
    )
    model = mlp()
    plugin = sara(model, trainable_fraction=0.05, rank_min_dim=8, rank_min_entries=1000)
    assert (
        plugin.objective_terms(
            module=None, batch={"target": torch.zeros(2)}, outputs={}, ctx=StepContext()
        )
        is None
    )


def test_reselection_happens_exactly_after_step_t_and_freezes_entries_that_grew():
    model = mlp()
    plugin = sara(model, trainable_fraction=0.2, progressive_iter=3, lambda_rank=0.0)
    part = model[2].parametrizations.weight[0]
    start = part.mask.clone()
    train(model, plugin, steps=2)
    assert torch.equal(part.mask, start) and not plugin.reselected
    train(model, plugin, steps=3)  # a fresh loop: its steps 0..2, re-selection after step 3
    assert plugin.reselected
    w = model[2].weight.detach()
    # the new set is the old one minus the entries that left |w| < ε; nothing new joins
    assert torch.equal(part.mask, start & (w.abs() < plugin.threshold))
    assert int(part.mask.sum()) < int(start.sum())
    assert torch.equal(part.frozen[~part.mask], w[~part.mask])


def test_merge_gives_a_plain_model_computing_the_same_function():
    model = mlp()
    plugin = sara(model, trainable_fraction=0.2, progressive_iter=2)
    train(model, plugin, steps=4)
    x, _ = data()
    before = model(x)
    merged = merge(model, [plugin])
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert_close(merged(x), before)


def test_state_is_plain_and_a_checkpoint_of_another_threshold_is_refused():
    model = mlp()
    plugin = sara(model, trainable_fraction=0.2, progressive_iter=1)
    train(model, plugin, steps=1)
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state == {"threshold": plugin.threshold, "reselected": True}
    again = sara(mlp(), trainable_fraction=0.2, progressive_iter=1)
    again.load_state_dict(state)
    assert again.reselected
    other = sara(mlp(), threshold=1e-3)
    with pytest.raises(ValueError, match="trained with ε"):
        other.load_state_dict(state)
