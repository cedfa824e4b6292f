"""The plugin on small models: the shared array, compression 1, merge, seeds and state."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.reparam import Layers, merge, trainable_parameters
from paperhooks_stable_rps import StableRps, StableRpsConfig

RECIPE = Path(__file__).parents[3] / "recipes" / "stable-rps.yaml"


class Holder:
    """What the hook reads of a HookedModule: ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def shared(model: nn.Module, seed: int = 0, **config) -> StableRps:
    plugin = StableRps(StableRpsConfig(**config))
    plugin.name = "stable-rps"
    plugin.reparam_setup(module=Holder(model), ctx=StepContext(seed=seed))
    return plugin


def sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(3, (n,), generator=g)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["stable-rps"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"compression": 0.5}, "compression"),
        ({"compression": float("inf")}, "compression"),
        ({"init_std": 0.0}, "init_std"),
        ({"mapping": "roast"}, "mapping"),
        ({"grad_scaler": "v9"}, "grad_scaler"),
        ({"init": "zeros"}, "init"),
        ({"hash_seed": -1}, "hash_seed"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"StableRpsConfig.{field}"):
        StableRpsConfig(**kwargs)


def test_one_shared_array_on_the_model_replaces_every_selected_weight():
    model = mlp()
    w0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    plugin = shared(model, compression=4.0)
    # n = 5·7 + 7·3 = 56 weights, m = ⌊56/4⌋ = 14 slots; trainable: z and the two biases
    assert (plugin.mapped, plugin.array_size) == (56, 14)
    z = model.stable_rps_z
    assert isinstance(z, nn.Parameter) and z.shape == (14,)
    assert trainable_parameters(model) == 14 + 7 + 3
    for layer, w in zip((model[0], model[2]), w0, strict=True):
        original = layer.parametrizations.weight.original
        assert original.numel() == 0 and not original.requires_grad
        part = layer.parametrizations.weight[0]
        # W = λ g ⊙ z[h], λ = std(W₀)/σ_init with σ_init = 0.04
        assert part.scale == pytest.approx(float(w.std()) / 0.04)
        assert_close(layer.weight, part.scale * part.sign * z[part.index])
    # RANDOMFOLD: 56 positions in 14 slots, 4 each
    assert plugin._counts.tolist() == [4.0] * 14


def test_the_gradient_of_z_is_the_scaled_sum_of_both_layers_signed_gradients():
    model = mlp()
    plugin = shared(model, compression=4.0)
    x, y = data()
    plain = mlp()  # same architecture, weights set to the effective ones
    with torch.no_grad():
        plain[0].weight.copy_(model[0].weight)
        plain[2].weight.copy_(model[2].weight)
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(plain(x), y).backward()
    # ∂L/∂z_k = Σ over both layers of λ g ∂L/∂W at positions mapped to k, divided by s_k = A_k²/c_k
    total = torch.zeros(14, dtype=torch.float64)
    for layer, p in zip((model[0], model[2]), (plain[0], plain[2]), strict=True):
        part = layer.parametrizations.weight[0]
        total.index_add_(
            0, part.index.reshape(-1), (part.scale * part.sign * p.weight.grad).reshape(-1).double()
        )
    lam = plugin.scales
    a = torch.zeros(14, dtype=torch.float64)
    for layer, s in zip((model[0], model[2]), lam, strict=True):
        a.index_add_(
            0,
            layer.parametrizations.weight[0].index.reshape(-1),
            torch.full((layer.weight.numel(),), float(s), dtype=torch.float64),
        )
    assert_close(
        model.stable_rps_z.grad.double(), total / (a * a / plugin._counts), rtol=1e-5, atol=1e-7
    )


def test_at_compression_1_randomfold_is_the_uncompressed_model_and_trains_like_it():
    x, y = data()
    model, reference = mlp(), mlp()
    shared(model, compression=1.0, init="project")
    # a bijection: the projected z reproduces every weight, so the function is the original one
    assert_close(model(x), reference(x))
    # and with the v1 scaler, SGD on z moves the effective weights exactly as SGD moves W
    sgd_steps(model, x, y)
    sgd_steps(reference, x, y)
    assert_close(model[0].weight, reference[0].weight, rtol=1e-5, atol=1e-6)
    assert_close(model[2].weight, reference[2].weight, rtol=1e-5, atol=1e-6)

    # from the paper's random init too: the model trains as the plain network started at its
    # effective weights (different λ per layer, one weight per slot)
    model = mlp()
    shared(model, compression=1.0)
    start = mlp()
    with torch.no_grad():
        start[0].weight.copy_(model[0].weight)
        start[2].weight.copy_(model[2].weight)
    sgd_steps(model, x, y)
    sgd_steps(start, x, y)
    assert_close(model[2].weight, start[2].weight, rtol=1e-5, atol=1e-6)


def test_at_compression_1_hashednet_is_not_the_uncompressed_model():
    # independent hashing collides even at m = n: the projection averages colliding weights
    x, _ = data()
    model, reference = mlp(), mlp()
    plugin = shared(model, compression=1.0, init="project", mapping="hashednet")
    assert int((plugin._counts == 0).sum()) > 0
    assert (model(x) - reference(x)).abs().max() > 1e-2


def test_merge_gives_a_plain_model_computing_the_same_function_also_under_a_pruning_mask():
    x, y = data()
    model = mlp()
    plugin = shared(model, compression=3.0)
    sgd_steps(model, x, y, steps=2)
    masks = pruning.add_masks(model)  # the core registers masks after every reparameterization
    with torch.no_grad():
        masks["2"].mask.view(-1)[:4] = False
    before = model(x)
    merged = merge(model, [plugin])
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert not hasattr(merged, "stable_rps_z")
    assert sorted(n for n, _ in merged.named_parameters()) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
    ]
    assert all(p.requires_grad for p in merged.parameters())
    assert_close(merged(x), before)
    assert int((merged[2].weight.view(-1)[:4] != 0).sum()) == 0


def test_a_layer_already_reparameterized_is_refused_naming_the_plugin():
    model = mlp()

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[0], "weight", Double())
    with pytest.raises(ValueError, match="'stable-rps' .* must be the first reparameterization"):
        shared(model)


def test_layers_select_what_is_shared():
    model = mlp()
    plugin = shared(model, compression=1.0, layers=Layers(types=("Linear",), skip_head=True))
    assert (
        plugin.mapped == 35
        and parametrize.is_parametrized(model[0])
        and not parametrize.is_parametrized(model[2])
    )


def test_the_hash_seed_comes_from_the_recipe_and_a_checkpoint_of_another_seed_rebuilds_its_map():
    x, _ = data()
    a_model, b_model = mlp(), mlp()
    a = shared(a_model, seed=7, compression=2.0)
    b = shared(b_model, seed=8, compression=2.0)
    assert a.hash_seed == 7 and b.hash_seed == 8
    assert not torch.equal(
        a_model[0].parametrizations.weight[0].index, b_model[0].parametrizations.weight[0].index
    )
    # the plugin state is saved with plain types; loading it (as a resumed run does) rebuilds
    # seed 7's map in b, and with z from the same checkpoint b computes what a computes
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert sorted(state) == ["array_size", "hash_seed", "mapped", "mapping", "scales"]
    b.load_state_dict(state)
    with torch.no_grad():
        b_model.stable_rps_z.copy_(a_model.stable_rps_z)
    assert b.hash_seed == 7
    assert_close(b_model(x), a_model(x))
    # fixed in the config, the seed is the config's on every rank, whatever the recipe seed
    assert shared(mlp(), seed=3, hash_seed=1011).hash_seed == 1011


def test_a_checkpoint_of_another_array_size_is_refused():
    a = shared(mlp(), compression=2.0)
    b = shared(mlp(), compression=4.0)
    with pytest.raises(ValueError, match="shares 56 weights in 28 slots"):
        b.load_state_dict(a.state_dict())


def test_deepcopy_keeps_a_working_model():
    # Lightning and users copy modules (e.g. for EMA); the copy must read its own z
    model = mlp()
    shared(model, compression=2.0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.stable_rps_z.zero_()
    assert not torch.equal(model[0].weight, twin[0].weight)
    assert torch.equal(twin[0].weight, torch.zeros_like(twin[0].weight))
