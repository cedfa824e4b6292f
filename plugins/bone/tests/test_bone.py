"""Bone: hand-derived blocks, agreement with peft, merge/unmerge, the conformance kit, FSDP2."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from paperhooks.recipe import load as load_recipe
from paperhooks.reparam import Layers, merge, trainable_parameters
from paperhooks.testing import load_checkpoint
from paperhooks.testing.conformance import (
    PluginConformance,
    check_ddp_equals_single,
    check_few_steps,
)
from paperhooks_bone import (
    Bone,
    BoneBlock,
    BoneConfig,
    bat_delta,
    bat_unmerge,
    bone_delta,
    bone_forward,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "bone.yaml"


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, reparameterization properties, a few steps,
    bit-identical resume, 2 DDP processes equal 1 (slow). The kit's MLP is 64-16-10; the
    first Linear is adapted (the head is skipped), with r = 8."""

    name = "bone"
    plugin_config = {"r": 8}


class _Module:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


# -- the equations, by hand -------------------------------------------------------------------
def test_plain_bone_tiles_b_along_the_input_by_hand():
    # r = 2, out = 3, in = 5: ΔW[o, 2j + k] = b[k, o], the last tile cut to 1 column.
    b = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    expected = torch.tensor([[1.0, 4, 1, 4, 1], [2, 5, 2, 5, 2], [3, 6, 3, 6, 3]])
    assert_close(bone_delta(b, 5), expected)
    # PEFT's forward: x = 1⁵ padded to 6, chunks [1,1],[1,1],[1,0] sum to [3, 2];
    # [3, 2] @ b = 3·[1,2,3] + 2·[4,5,6] = [11, 16, 21] = ΔW·1⁵.
    assert_close(
        bone_forward(torch.ones(1, 5), torch.zeros(3, 5), b), torch.tensor([[11.0, 16.0, 21.0]])
    )


def test_bat_blocks_by_hand():
    # W = arange(16) as 4×4, r = 2: W_00 = [[0,1],[4,5]], W_01 = [[2,3],[6,7]],
    # W_10 = [[8,9],[12,13]], W_11 = [[10,11],[14,15]]; B_0 = [[1,0],[0,0]], B_1 = [[0,0],[1,0]].
    #   ΔW_00 = W_00 B_0 + B_0 = [[0,0],[4,0]] + B_0 = [[1,0],[4,0]]
    #   ΔW_01 = [[2,0],[6,0]] + B_0 = [[3,0],[6,0]]
    #   ΔW_10 = W_10 B_1 + B_1 = [[9,0],[13,0]] + B_1 = [[9,0],[14,0]]
    #   ΔW_11 = [[11,0],[15,0]] + B_1 = [[11,0],[16,0]]
    W = torch.arange(16.0).reshape(4, 4)
    B = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])
    expected = torch.tensor([[1.0, 0, 3, 0], [4, 0, 6, 0], [9, 0, 11, 0], [14, 0, 16, 0]])
    assert_close(bat_delta(W, B), expected)
    # unmerge: W_ij = (W'_ij − B_i)(I + B_i)⁻¹ gives W back
    assert_close(bat_unmerge(W + expected, B), W)


@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_gradients_by_finite_differences(variant):
    # with respect to the block and (BAT: W enters ΔW) the frozen weight, in float64
    torch.manual_seed(0)
    p = BoneBlock(variant, 2, 4, 6).double()
    with torch.no_grad():
        p.block.normal_()
    W = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def forward(weight, block):
        return weight + (bone_delta(block, 6) if variant == "bone" else bat_delta(weight, block))

    assert torch.autograd.gradcheck(forward, (W, p.block.detach().clone().requires_grad_(True)))
    assert_close(forward(W, p.block), p(W))  # the module computes the functional form


# -- agreement with peft --------------------------------------------------------------------------
def _peft():
    """peft's Bone: ``MissLinear``/``MissConfig`` (peft renamed Bone to MiSS; tested with peft
    0.21.2, where ``init_weights=True`` is Bone and ``"bat"`` is BAT), else the older
    ``BoneLinear``/``BoneConfig``. Returns (layer class, config class, block attribute)."""
    try:
        from peft import MissConfig
        from peft.tuners.miss.layer import MissLinear

        return MissLinear, MissConfig, "miss_block"
    except ImportError:  # peft before the rename
        from peft import BoneConfig as PeftBoneConfig
        from peft.tuners.bone.layer import BoneLinear

        return BoneLinear, PeftBoneConfig, "bone_block"


def _peft_layer(base: nn.Linear, variant: str, r: int):
    layer_cls, config_cls, attr = _peft()
    init = True if variant == "bone" else "bat"
    if attr == "miss_block":
        layer = layer_cls(base, "default", config_cls(r=r, init_weights=init), r=r)
    else:
        layer = layer_cls(base, "default", r=r, init_weights=init)
    return layer.to(base.weight.dtype), attr  # the block is created in the default dtype


@pytest.mark.parametrize(
    ("variant", "out_f", "in_f", "r"),
    [("bone", 12, 16, 4), ("bone", 12, 10, 4), ("bat", 12, 16, 4), ("bat", 8, 24, 8)],
)
def test_forward_merge_and_unmerge_agree_with_peft_miss(variant, out_f, in_f, r):
    torch.manual_seed(1)
    base = nn.Linear(in_f, out_f).double()
    ours = copy.deepcopy(base)
    theirs, attr = _peft_layer(base, variant, r)
    Bone(
        BoneConfig(variant=variant, r=r, layers=Layers(types=("Linear",), skip_head=False))
    ).reparam_setup(module=_Module(nn.Sequential(ours)), ctx=None)
    block = 0.3 * torch.randn_like(getattr(theirs, attr)["default"])
    with torch.no_grad():
        getattr(theirs, attr)["default"].copy_(block)
        ours.parametrizations.weight[0].block.copy_(block)
    x = torch.randn(7, in_f, dtype=torch.float64)
    assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-12)
    w0 = ours.parametrizations.weight.original.detach().clone()
    theirs.merge()
    assert_close(ours.weight, theirs.base_layer.weight, atol=1e-12, rtol=1e-12)
    theirs.unmerge()  # peft inverts (I + B_i) in float32, whatever the dtype: float32 accuracy
    assert_close(theirs.base_layer.weight, w0, atol=1e-6, rtol=0)
    # our unmerge: assigning the merged weight recovers W through right_inverse
    merged = ours.weight.detach().clone()
    ours.weight = merged
    assert_close(ours.parametrizations.weight.original, w0, atol=1e-12, rtol=1e-12)
    assert_close(ours.weight, merged, atol=1e-12, rtol=1e-12)


def test_whole_model_agrees_with_get_peft_model():
    from peft import get_peft_model

    _, config_cls, attr = _peft()
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    ours = copy.deepcopy(model)
    theirs = get_peft_model(
        copy.deepcopy(model), config_cls(r=4, init_weights="bat", target_modules=["0", "2"])
    )
    Bone(BoneConfig(variant="bat", r=4)).reparam_setup(module=_Module(ours), ctx=None)
    for i in (0, 2):
        block = 0.2 * torch.randn(2, 4, 4)
        with torch.no_grad():
            getattr(theirs.base_model.model[i], attr)["default"].copy_(block)
            ours[i].parametrizations.weight[0].block.copy_(block)
    x = torch.randn(5, 16)
    assert_close(ours(x), theirs(x))
    # the same trainable set: the blocks only (2 × 32), everything else frozen
    assert (
        trainable_parameters(ours)
        == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
        == 64
    )


# -- the plugin on a model -------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["bone", "bat"])
def test_setup_keeps_the_function_freezes_the_base_and_merge_is_plain(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(5, 8)
    before = model(x).detach()
    Bone(BoneConfig(variant=variant, r=4, trainable=("4.*",))).reparam_setup(
        module=_Module(model), ctx=None
    )
    assert_close(model(x), before)  # zero blocks
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "0.parametrizations.weight.0.block",
        "2.parametrizations.weight.0.block",
        "4.bias",
        "4.weight",
    ]
    # r·out per adapted layer (4·8 + 4·4) plus the head's 4·3 + 3
    assert trainable_parameters(model) == 32 + 16 + 15
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.parametrizations.weight[0].block.normal_(0, 0.3)
    adapted = model(x).detach()
    assert not torch.allclose(adapted, before)
    merged = merge(model)
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert_close(merged(x), adapted)


def test_bat_refuses_a_block_size_that_does_not_divide_the_weight():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match=r"bat needs r = 4 to divide .*\(0: weight \[10, 12\]\)"):
        Bone(BoneConfig(variant="bat", r=4)).reparam_setup(module=_Module(model), ctx=None)
    with pytest.raises(ValueError, match=r"r = 16 must be at most"):
        Bone(BoneConfig(r=16)).reparam_setup(module=_Module(model), ctx=None)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"variant": "lora"}, "variant"),
        ({"r": 0}, "r"),
        ({"layers": Layers(types=("Conv2d",))}, "layers.types"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"BoneConfig.{field}"):
        BoneConfig(**kwargs)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["bone"]


def test_checkpoint_keys_are_stable_and_load_with_weights_only(tmp_path):
    metrics = check_few_steps("bone", {"variant": "bat", "r": 8}, tmp_path)
    assert (
        metrics["model/trainable_parameters"] == 16 * 8
    )  # the block of Linear(64, 16): (16/8)·8·8
    assert metrics["bone/delta_ratio"] > 0
    ckpt = load_checkpoint(tmp_path / "runs" / "few-steps" / "version_0")
    assert sorted(ckpt["state_dict"]) == [
        "model.1.bias",
        "model.1.parametrizations.weight.0.block",
        "model.1.parametrizations.weight.original",
        "model.4.bias",
        "model.4.weight",
    ]
    assert ckpt["state_dict"]["model.1.parametrizations.weight.0.block"].shape == (2, 8, 8)


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process(tmp_path):
    # BAT: the block is sharded by FSDP2 and all-gathered with W inside the forward
    check_ddp_equals_single(
        "bone", {"variant": "bat", "r": 8, "trainable": ["4.*"]}, tmp_path, strategy="fsdp2"
    )
