"""PST: scores, straight-through gradients and schedule by hand; masks in a fit; the conformance kit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.testing import assert_close

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.testing.conformance import PluginConformance
from paperhooks.testing.metadata import tiny_recipe
from paperhooks.testing.runs import _fit
from paperhooks_pst import Pst, PstConfig, PstWeight, cubic_bounds, pst_scores

RECIPE = Path(__file__).parents[3] / "recipes" / "pst.yaml"

#: the ramp spans the whole fit (t_w = t_f = 0), so the kit's resume (step 13 of 16) and
#: DDP (6 steps) checks stop in the middle of the schedule; small ranks for the kit's 64-16-10 MLP
KIT = {
    "final_sparsity": 0.5,
    "initial_warmup": 0.0,
    "final_warmup": 0.0,
    "weight_rank": 2,
    "mask_rank": 2,
}


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, pruning and reparameterization properties, a
    few steps, bit-identical resume in the middle of the ramp, 2 DDP processes equal 1 (slow;
    the state dict compared includes the boolean masks, so they are identical on both ranks)."""

    name = "pst"
    plugin_config = KIT


class _Module:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


# -- the equations, by hand -------------------------------------------------------------------------
def test_scores_by_hand():
    # W' = [[1, −2], [0.5, 0]], A = [[1], [0]], B = [[0.5, −1]], R = [0.1, 0], C = [0, 0.2]:
    #   |W'|        = [[1, 2], [0.5, 0]]
    #   A B         = [[0.5, −1], [0, 0]]
    #   R1ᵀ + 1Cᵀ   = [[0.1, 0.3], [0, 0.2]]
    #   S (α = 1)   = [[1.6, 1.3], [0.5, 0.2]];  with α₁ = 2, α₂ = 0: [[2, 0], [0.5, 0]]
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    A, B = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.5, -1.0]])
    R, C = torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.2])
    assert_close(pst_scores(w, A, B, R, C), torch.tensor([[1.6, 1.3], [0.5, 0.2]]))
    assert_close(pst_scores(w, A, B, R, C, 2.0, 0.0), torch.tensor([[2.0, 0.0], [0.5, 0.0]]))


def test_straight_through_gradients_by_hand():
    # One 2×2 layer, r_w = r_m = 1, β = 1. W = [[1, −2], [3, 0.5]], U = [[1], [0]], V = [[0.5, 0]]
    # → W' = [[1.5, −2], [3, 0.5]]. A = [[1], [1]], B = 0, R = C = 0. Mask M = [[1, 0], [1, 1]].
    # L = Σ G ⊙ W_eff with G = [[1, 2], [−1, 1]]; W_eff = M ⊙ W'.
    #   value: W_eff = [[1.5, 0], [3, 0.5]]
    #   ∂L/∂S = M ⊙ G ⊙ W' = [[1.5, 0], [−3, 0.5]]     (the STE; 0 at the pruned entry, see card)
    #   ∂L/∂R = row sums = [1.5, −2.5];  ∂L/∂C = column sums = [−1.5, 0.5]
    #   ∂L/∂B = Aᵀ ∂L/∂S = [[−1.5, 0.5]];  ∂L/∂A = ∂L/∂S Bᵀ = 0
    #   ∂L/∂W' = M ⊙ G + ∂L/∂S ⊙ sign(W') = [[1, 0], [−1, 1]] + [[1.5, 0], [−3, 0.5]] = [[2.5, 0], [−4, 1.5]]
    #   ∂L/∂V = Uᵀ ∂L/∂W' = [[2.5, 0]];  ∂L/∂U = ∂L/∂W' Vᵀ = [[1.25], [−2]]
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    p = PstWeight(2, 2, weight_rank=1, mask_rank=1)
    with torch.no_grad():
        p.U.copy_(torch.tensor([[1.0], [0.0]]))
        p.V.copy_(torch.tensor([[0.5, 0.0]]))
        p.A.copy_(torch.tensor([[1.0], [1.0]]))
    parametrize.register_parametrization(layer, "weight", p)
    (mask,) = pruning.add_masks(nn.Sequential(layer)).values()
    mask.mask.copy_(torch.tensor([[True, False], [True, True]]))
    G = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    w_eff = layer.weight
    assert torch.equal(w_eff, torch.tensor([[1.5, 0.0], [3.0, 0.5]]))  # exactly M ⊙ W'
    (G * w_eff).sum().backward()
    assert_close(p.R.grad, torch.tensor([1.5, -2.5]))
    assert_close(p.C.grad, torch.tensor([-1.5, 0.5]))
    assert_close(p.B.grad, torch.tensor([[-1.5, 0.5]]))
    assert_close(p.A.grad, torch.zeros(2, 1))
    assert_close(p.V.grad, torch.tensor([[2.5, 0.0]]))
    assert_close(p.U.grad, torch.tensor([[1.25], [-2.0]]))


def _official_schedule(step, total, t_w, t_f, s_i, s_f):
    # schedule_sparsity_ratio of pst/utils.py, written out from its formula
    if step <= t_w * total:
        return s_i
    if step > total - t_f * total:
        return s_f
    return s_f + (s_i - s_f) * (1 - (step - t_w * total) / (total - (t_w + t_f) * total)) ** 3


def test_schedule_by_hand_and_equal_to_the_official_formula():
    # T = 100, t_w = t_f = 0.1, 0 → 0.9 (notes' check): ramp over steps 10..90;
    # step 50: 1 − 40/80 = 0.5, 0.9·(1 − 0.5³) = 0.7875. Official defaults (t_f = 0.3): step 40:
    # 1 − 30/60 = 0.5 → 0.7875 again; step 70 is the last change, 0.9.
    plugin = Pst(PstConfig(final_sparsity=0.9, initial_warmup=0.1, final_warmup=0.1))
    at = lambda t, T=100: plugin.pruning_schedule(ctx=StepContext(step=t, max_steps=T))  # noqa: E731
    assert cubic_bounds(100, 0.1, 0.1) == (10, 90)
    assert at(50) == pytest.approx(0.7875)
    assert at(10) == 0.0 and at(90) == pytest.approx(0.9)
    assert at(9) is None and at(91) is None  # the masks stay: s_i before, s_f after
    official = Pst(PstConfig())
    assert official.pruning_schedule(ctx=StepContext(step=40, max_steps=100)) == pytest.approx(
        0.7875
    )
    # every step of the ramp equals the official function; outside it the mask is kept at the
    # value the official function returns there (s_i before, s_f after)
    for T, tw, tf in ((100, 0.1, 0.3), (200, 0.1, 0.1), (50, 0.2, 0.4)):
        p = Pst(
            PstConfig(final_sparsity=0.8, initial_sparsity=0.1, initial_warmup=tw, final_warmup=tf)
        )
        last = None
        for t in range(T + 1):
            s = p.pruning_schedule(ctx=StepContext(step=t, max_steps=T))
            last = s if s is not None else last
            expected = _official_schedule(t, T, tw, tf, 0.1, 0.8)
            assert (last if last is not None else 0.1) == pytest.approx(expected, abs=1e-12), (T, t)


def test_zero_initialized_scores_are_per_layer_magnitude_pruning():
    # V = B = R = C = 0 at the start: S = |W|, so the masks are prune.l1_unstructured per layer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = [torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)]
    for r, m in zip(ref, (model[0], model[2]), strict=True):
        r.weight.data.copy_(m.weight.data)
    plugin = Pst(PstConfig(weight_rank=2, mask_rank=2))
    module = _Module(model)
    plugin.reparam_setup(module=module, ctx=StepContext(seed=3))
    masks = pruning.add_masks(model)
    params = pruning.local_weights(model, masks)
    scores = plugin.pruning_scores(params=params, module=module, ctx=StepContext())
    keep = plugin.pruning_allocate(scores=scores, sparsity=0.7, ctx=StepContext())
    for k, r in zip(("0", "2"), ref, strict=True):
        prune.l1_unstructured(r, "weight", amount=0.7)
        assert torch.equal(keep[k], r.weight_mask.bool())
        assert int((~keep[k]).sum()) == round(0.7 * keep[k].numel())


def test_only_the_pst_tensors_train_and_their_count():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    Pst(PstConfig()).reparam_setup(module=_Module(model), ctx=StepContext())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.parametrizations.weight.0.{t}" for i in (0, 2) for t in "UVABRC"}
    # per layer n·r_w + r_w·k + n·r_m + r_m·k + n + k with r = 8:
    #   64→32: 32·8 + 8·64 + 32·8 + 8·64 + 32 + 64 = 1632;  32→10: 80 + 256 + 80 + 256 + 10 + 32 = 714
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1632 + 714


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"final_sparsity": 1.0}, "final_sparsity"),
        ({"initial_warmup": 0.6, "final_warmup": 0.5}, "initial_warmup"),
        ({"mask_rank": 0}, "mask_rank"),
        ({"weight_beta": -1.0}, "weight_beta"),
        ({"initial_sparsity": 0.95}, "initial_sparsity"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PstConfig.{field}"):
        PstConfig(**kwargs)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [name for name, _ in recipe.stages] == ["dense", "pst"]
    assert [p.name for p in recipe.stages[1][1].plugins] == ["pst"] and not recipe.stages[0][
        1
    ].plugins


# -- in a fit ----------------------------------------------------------------------------------------
def test_fit_reaches_the_sparsity_exactly_keeps_w_frozen_and_reports_trainable_count(tmp_path):
    raw = tiny_recipe(
        [{"name": "pst", **KIT, "final_sparsity": 0.8, "final_warmup": 0.25}],
        run_dir=tmp_path / "runs",
        trainer={"max_steps": 12, "limit_val_batches": 0, "checkpoint_every_n_steps": 6},
    )
    built, _ = _fit(raw)
    ckpt = torch.load(built.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    mid = torch.load(built.run_dir / "checkpoints" / "step6.ckpt", weights_only=True)["state_dict"]
    sd = ckpt["state_dict"]
    assert len(_masked(sd)) == 2
    total = kept = 0
    for layer in _masked(sd):
        # W and its bias frozen; U..C moved
        for t in ("parametrizations.weight.original", "bias"):
            assert torch.equal(mid[f"{layer}.{t}"], sd[f"{layer}.{t}"])
        assert not torch.equal(
            mid[f"{layer}.parametrizations.weight.0.B"], sd[f"{layer}.parametrizations.weight.0.B"]
        )
        m = sd[f"{layer}.parametrizations.weight.1.mask"]
        assert int((~m).sum()) == round(0.8 * m.numel())  # every layer at s_f exactly
        total, kept = total + m.numel(), kept + int(m.sum())
    assert ckpt["paperhooks"]["sparsity"] == pytest.approx(1 - kept / total)
    metrics = json.loads((built.run_dir / "metrics.json").read_text())
    pst_params = sum(
        v.numel() for k, v in sd.items() if ".parametrizations.weight.0." in k and k[-1] in "UVABRC"
    )
    assert metrics["model/trainable_parameters"] == pst_params


def _masked(sd):
    return sorted(
        k[: -len(".parametrizations.weight.1.mask")]
        for k in sd
        if k.endswith(".parametrizations.weight.1.mask")
    )
