"""Helpers of the reparameterization family (paperhooks.reparam)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import pruning
from paperhooks.reparam import Layers, merge, select_layers, trainable_parameters
from paperhooks.schema import build as config_build


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_layers_select_by_type_and_pattern_and_leave_the_head_out():
    model = mlp()
    assert [n for n, _ in select_layers(model, Layers())] == ["0", "2"]  # "4" is the head
    assert [n for n, _ in select_layers(model, Layers(skip_head=False))] == ["0", "2", "4"]
    assert [n for n, _ in select_layers(model, Layers(exclude=("0",)))] == ["2"]
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    names = [n for n, _ in select_layers(net, Layers(types=("Conv2d", "Linear")))]
    assert (
        "fc" not in names and "conv1" in names and len(names) == 20
    )  # timm's get_classifier() is fc
    assert [n for n, _ in select_layers(net, Layers(types=("Conv2d",), include=("layer4.*",)))][
        :2
    ] == ["layer4.0.conv1", "layer4.0.conv2"]


def test_a_selection_of_nothing_names_the_plugin_and_the_layers_there_are():
    with pytest.raises(
        ValueError,
        match=r"plugin 'bone': layers .* selects no layer; layers of those types: \['0', '2', '4'\]",
    ):
        select_layers(mlp(), Layers(include=("encoder.*",)), plugin="bone")


@dataclass(frozen=True)
class WithLayers:
    rank: int = 2
    layers: Layers = Layers()


def test_layers_come_from_a_recipe_mapping_and_bad_types_name_the_key():
    cfg = config_build(
        WithLayers, {"layers": {"types": ["Linear"], "exclude": ["head*"]}}, "plugins.bone"
    )
    assert cfg.layers == Layers(types=("Linear",), exclude=("head*",))
    with pytest.raises(Exception, match="layers.types"):
        config_build(WithLayers, {"layers": {"types": ["Dense"]}}, "plugins.bone")


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1.0


class Unwraps:
    """A plugin that wraps a module and undoes it on merge."""

    calls: list = []

    def __init__(self, tag):
        self.tag = tag

    def reparam_merge(self, model):
        Unwraps.calls.append(self.tag)
        if isinstance(model[0], Wrapper):
            inner = model[0].inner
            with torch.no_grad():
                inner.bias += 1.0
            model[0] = inner


def test_merge_folds_stacked_parametrizations_and_masks_and_keeps_the_function():
    torch.manual_seed(0)
    model = mlp()
    model[0] = Wrapper(model[0])
    for _name, layer in select_layers(model, Layers()):
        parametrize.register_parametrization(layer, "weight", Double())
    masks = pruning.add_masks(model)
    some = "2"
    assert some in masks
    pruning_layer = pruning.prunable(model)[some]
    with torch.no_grad():
        pruning_layer.parametrizations.weight[-1].mask.view(-1)[:5] = 0  # a pruned block
    x = torch.randn(6, 4)
    before = model(x)
    Unwraps.calls = []
    merged = merge(model, [Unwraps("first"), Unwraps("second")])
    assert Unwraps.calls == ["second", "first"]  # reverse recipe order
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert not isinstance(merged[0], Wrapper)
    torch.testing.assert_close(merged(x), before)
    assert int((pruning.prunable(merged)[some].weight.view(-1)[:5] != 0).sum()) == 0


def test_trainable_parameters_count_shared_tensors_once_and_skip_frozen_ones():
    model = mlp()
    assert trainable_parameters(model) == (4 * 8 + 8) + (8 * 8 + 8) + (8 * 3 + 3)
    model[2].weight.requires_grad_(False)
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert trainable_parameters(model) == (4 * 8 + 8) + 8 + (8 * 3 + 3)
    assert trainable_parameters(tied) == 15
