"""Stages, sharing, expansion and the distillation loss on small examples worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from paperhooks.reparam import trainable_parameters
from paperhooks_learngene_sws import (
    LearngeneMLP,
    LearngeneMLPConfig,
    distillation_loss,
    expand,
    learngene_layers,
    spread,
    stage_of_block,
    stage_starts,
    tie_stages,
    untie,
)


def test_stage_bookkeeping_by_hand():
    # the code's 16-layer auxiliary model: stages [3, 3, 4, 3, 3] start at 0, 3, 6, 10, 13
    assert stage_starts([3, 3, 4, 3, 3]) == [0, 3, 6, 10, 13]
    assert stage_of_block([2, 1, 3]) == [0, 0, 1, 2, 2, 2]
    # the code's 12-layer descendant example: '0,0,0,1,1,1,2,2,3,3,4,4' = 12 over 5 stages
    assert spread(12, 5) == (0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4)
    assert spread(8, 3) == (0, 0, 0, 1, 1, 1, 2, 2)
    assert spread(3, 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="give layers_source"):
        spread(2, 3)


def _mlp(depth: int, seed: int = 0, dim: int = 8) -> LearngeneMLP:
    torch.manual_seed(seed)
    return LearngeneMLP(5, 3, LearngeneMLPConfig(dim=dim, depth=depth, mlp_ratio=2))


def test_sharing_keeps_one_block_per_stage_and_counts_its_parameters_once():
    model = _mlp(6)
    block = sum(
        p.numel() for p in model.blocks[0].parameters()
    )  # LN 2·8 + fc1 8·16+16 + fc2 16·8+8 = 296
    assert block == 296
    others = 5 * 8 + 8 + 2 * 8 + 8 * 3 + 3  # stem, final norm, head
    assert trainable_parameters(model) == 6 * block + others
    tie_stages(model.blocks, [2, 1, 3])
    assert (
        model.blocks[0] is model.blocks[1] and model.blocks[3] is model.blocks[4] is model.blocks[5]
    )
    assert model.blocks[1] is not model.blocks[2] is not model.blocks[3]
    assert trainable_parameters(model) == 3 * block + others  # S × block size (+ the rest)
    with pytest.raises(ValueError, match=r"stages \[2, 2\] need 4 blocks, the model has 6"):
        tie_stages(_mlp(6).blocks, [2, 2])


def test_a_shared_layer_gets_the_sum_of_its_gradients_by_hand():
    # two uses of one weight w: y = w·(w·x); at w = 3, x = 2: y = 18, dy/dw = 2·w·x = 12
    blocks = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    tie_stages(blocks, [2])
    with torch.no_grad():
        blocks[0].weight.fill_(3.0)
    y = blocks(torch.tensor([[2.0]]))
    y.sum().backward()
    assert y.item() == 18.0 and blocks[0].weight.grad.item() == 12.0
    # finite differences on the shared weight, double precision
    w, x, h = 3.0, 2.0, 1e-6
    assert math.isclose(((w + h) ** 2 * x - (w - h) ** 2 * x) / (2 * h), 12.0, rel_tol=1e-6)


def test_untie_copies_values_into_distinct_blocks_and_keeps_the_function():
    model = _mlp(4, seed=1)
    tie_stages(model.blocks, [2, 2])
    x = torch.randn(7, 5)
    before = model(x)
    untie(model.blocks)
    assert len({id(b) for b in model.blocks}) == 4
    assert torch.equal(model.blocks[1].fc1.weight, model.blocks[0].fc1.weight)
    assert_close(model(x), before, rtol=0, atol=0)


def test_expansion_copies_each_stage_layer_where_sigma_says():
    aux = _mlp(6, seed=2)
    tie_stages(aux.blocks, [2, 2, 2])
    state = {f"model.{k}": v for k, v in aux.state_dict().items()}
    gene = learngene_layers(state, "model.blocks.", [2, 2, 2])
    assert len(gene) == 3 and torch.equal(gene[1]["fc1.weight"], aux.blocks[2].fc1.weight)
    child = _mlp(4, seed=3)
    expand(gene, child.blocks, (0, 1, 1, 2))
    for j, s in enumerate((0, 1, 1, 2)):
        for k, v in child.blocks[j].state_dict().items():
            assert torch.equal(v, aux.blocks[2 * s].state_dict()[k]), (j, k)
    with torch.no_grad():
        child.blocks[1].fc1.weight.add_(1.0)  # copies, not views: the learngene is untouched
    assert not torch.equal(child.blocks[1].fc1.weight, aux.blocks[2].fc1.weight)
    assert torch.equal(child.blocks[2].fc1.weight, aux.blocks[2].fc1.weight)
    with pytest.raises(ValueError, match="names no stage"):
        expand(gene, child.blocks, (0, 1, 2, 3))
    with pytest.raises(ValueError, match="3 entries for a descendant of 4 blocks"):
        expand(gene, child.blocks, (0, 1, 2))


def test_distillation_loss_by_hand():
    zs, zt, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    # T = 1: p = softmax(zs) = [σ(1), σ(−1)], q = softmax(zt) = [σ(−1), σ(1)], log(q/p) = ∓1
    #   KL(q‖p) = σ(1) − σ(−1) = 0.4621172; per sample T²·KL/C = 0.2310586 (C = 2)
    assert_close(distillation_loss(zs, zt, y, alpha=1.0, tau=1.0), torch.tensor([0.2310586]))
    # T = 2: log(q/p) = ∓0.5: KL = 0.5·(σ(0.5) − σ(−0.5)) = 0.1224593; ·T²/C = 0.2449186
    # CE(zs, 0) = log(1 + e^−1) = 0.3132617; α = 0.5: 0.5·0.3132617 + 0.5·0.2449186 = 0.2790901
    assert_close(distillation_loss(zs, zt, y, alpha=0.5, tau=2.0), torch.tensor([0.2790901]))
    # hard: CE against argmax zt = 1: −log σ(−1) = 1.3132617
    assert_close(distillation_loss(zs, zt, y, alpha=1.0, kind="hard"), torch.tensor([1.3132617]))
    assert_close(distillation_loss(zs, None, y), torch.tensor([0.3132617]))  # no teacher: CE
    assert_close(distillation_loss(zs, zt, y, alpha=0.0, tau=2.0), torch.tensor([0.3132617]))


def test_the_batch_mean_equals_the_codes_distillation_loss():
    # losses.py: (1 − α)·CE_mean + α·kl_div(log_softmax(zs/T), log_softmax(zt/T), sum, log_target)·T²/numel
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(4, (6,), generator=g)
    a, t = 0.3, 1.7
    code = (
        F.kl_div(
            F.log_softmax(zs / t, 1), F.log_softmax(zt / t, 1), reduction="sum", log_target=True
        )
        * t
        * t
        / zs.numel()
    )
    code = (1 - a) * F.cross_entropy(zs, y) + a * code
    assert_close(distillation_loss(zs, zt, y, alpha=a, tau=t).mean(), code)


def test_the_distillation_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    assert torch.autograd.gradcheck(
        lambda z: distillation_loss(z, zt, y, alpha=0.4, tau=2.0), (zs,)
    )
    # the teacher gets no gradient
    zt.requires_grad_(True)
    distillation_loss(zs, zt, y).sum().backward()
    assert zt.grad is None
