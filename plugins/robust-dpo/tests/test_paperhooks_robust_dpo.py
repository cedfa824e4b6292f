"""Tests of ``robust-dpo``: hand-derived values, TRL's ``robust`` loss, the unbiasedness
identity, masks, the conformance runs on the causal-LM task, and the paper's effect."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.preference import dpo_loss, log_ratio_margin
from paperhooks.run import fit
from paperhooks.testing.conformance import (
    PREFERENCE_TASK,
    check_ddp_equals_single,
    check_entry_point,
    check_few_steps,
    check_metadata,
    check_recipe_roundtrip,
    check_resume,
)
from paperhooks.testing.preference import preference_batch, preference_module, trl_dpo_loss
from paperhooks_robust_dpo import RobustDpo, RobustDpoConfig, gradient_weight, robust_dpo_loss

RECIPE = Path(__file__).parents[3] / "recipes" / "robust-dpo.yaml"
KIT = {"epsilon": 0.3}


def _plugin(epsilon: float) -> RobustDpo:
    p = RobustDpo(RobustDpoConfig(epsilon=epsilon))
    p.name = "robust-dpo"
    return p


# -- the kit, on the causal-LM preference task ------------------------------------------------------------
def test_entry_point_metadata_and_recipe_round_trip():
    check_metadata(check_entry_point("robust-dpo"), "robust-dpo")
    check_recipe_roundtrip("robust-dpo", KIT)
    assert RobustDpo.replaces_task_loss


def test_few_steps_stay_finite(tmp_path):
    check_few_steps("robust-dpo", KIT, tmp_path, task=PREFERENCE_TASK)


def test_resume_is_bit_identical(tmp_path):
    check_resume("robust-dpo", KIT, tmp_path, task=PREFERENCE_TASK)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process(tmp_path):
    # atol 1e-5: Adam divides by √v per coordinate, so a float-order difference in the gradient
    # all-reduce (1e-9) shows as ~2e-6 on weights whose gradients are near 0 after 6 steps
    check_ddp_equals_single("robust-dpo", KIT, tmp_path, task=PREFERENCE_TASK, atol=1e-5)


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process(tmp_path):
    check_ddp_equals_single(
        "robust-dpo", KIT, tmp_path, strategy="fsdp2", task=PREFERENCE_TASK, atol=1e-5
    )


def test_recipe_file_validates():
    recipe = R.load(RECIPE)
    assert [p.name for p in recipe.plugins] == ["robust-dpo"]
    assert recipe.plugins[0].config == RobustDpoConfig(epsilon=0.3)


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.7, float("nan"), "0.1", True])
def test_config_rejects_bad_epsilon_naming_the_field(bad):
    with pytest.raises(ValueError, match="RobustDpoConfig.epsilon"):
        RobustDpoConfig(epsilon=bad)


# -- the loss, by hand ---------------------------------------------------------------------------------
def test_loss_by_hand():
    # β = 1, ε = 0.25, so 1 − 2ε = 0.5.
    # h = 0:      −log σ(0) = log 2 both ways → [(0.75 − 0.25) log 2] / 0.5 = log 2 = 0.693147
    # h = ln 3:   σ(ln 3) = 3/4, σ(−ln 3) = 1/4
    #             [0.75 · (−log 0.75) − 0.25 · (−log 0.25)] / 0.5
    #           = [0.75 · 0.287682 − 0.25 · 1.386294] / 0.5 = (0.215762 − 0.346574) / 0.5 = −0.261624
    # h = −ln 3:  [0.75 · 1.386294 − 0.25 · 0.287682] / 0.5 = (1.039721 − 0.071921) / 0.5 = 1.935601
    h = torch.tensor([0.0, math.log(3.0), -math.log(3.0)])
    expected = torch.tensor([math.log(2.0), -0.261624, 1.935601])
    assert_close(robust_dpo_loss(h, 1.0, 0.25), expected, atol=2e-6, rtol=0)
    # β = 0.5 scales h: β h = ln 3 at h = 2 ln 3
    assert_close(robust_dpo_loss(2 * h, 0.5, 0.25), expected, atol=2e-6, rtol=0)


def test_gradient_by_hand():
    # −∂ℓ̂/∂h = β [(1 − ε) σ(−βh) + ε σ(βh)] / (1 − 2ε); β = 1, ε = 0.25, h = ln 3:
    # [0.75 · 0.25 + 0.25 · 0.75] / 0.5 = 0.375 / 0.5 = 0.75   (DPO: σ(−ln 3) = 0.25)
    h = torch.tensor([math.log(3.0)], requires_grad=True)
    robust_dpo_loss(h, 1.0, 0.25).sum().backward()
    assert_close(h.grad, torch.tensor([-0.75]))
    assert_close(gradient_weight(h.detach(), 1.0, 0.25), torch.tensor([0.75]))


def test_unbiased_under_flips_identity():
    # (1 − ε) ℓ̂_ε(h) + ε ℓ̂_ε(−h) = −log σ(βh), for every h: the expected loss over a flip
    # at rate ε is the clean DPO loss.
    h = torch.linspace(-30.0, 30.0, 121, dtype=torch.float64)
    for eps in (0.0, 0.1, 0.3, 0.45):
        for beta in (0.1, 1.0):
            mixed = (1 - eps) * robust_dpo_loss(h, beta, eps) + eps * robust_dpo_loss(-h, beta, eps)
            assert_close(mixed, -torch.nn.functional.logsigmoid(beta * h), atol=1e-10, rtol=1e-10)


def test_epsilon_zero_is_dpo():
    dm, batch = preference_batch(rows=8)
    module = preference_module(dm)
    out = module.outputs(batch)
    dpo = module.losses(batch, out)
    terms = _plugin(0.0).objective_terms(module=module, batch=batch, outputs=out, ctx=None)
    assert_close(terms["loss"], dpo, atol=0, rtol=0)
    assert_close(
        terms["loss"],
        dpo_loss(
            out["chosen_logps"],
            out["rejected_logps"],
            out["ref_chosen_logps"],
            out["ref_rejected_logps"],
            module.objective.beta,
        ),
    )


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_equals_trl_robust_loss_on_the_same_log_probs(eps):
    """TRL's DPOTrainer, loss_type "robust" with label_smoothing = ε, on our log-probs."""
    dm, batch = preference_batch(rows=8, flip_rate=0.3)
    module = preference_module(dm)
    with torch.no_grad():  # a policy different from the reference, so that h ≠ 0
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = module.outputs(batch)
    assert log_ratio_margin(out).abs().min() > 1e-3
    for beta in (0.1, 1.0):
        module.objective = type(module.objective)(beta=beta)
        ours = (
            _plugin(eps)
            .objective_terms(module=module, batch=batch, outputs=out, ctx=None)["loss"]
            .mean()
        )
        assert_close(
            ours.detach(),
            trl_dpo_loss(out, beta, "robust", label_smoothing=eps),
            atol=1e-6,
            rtol=1e-6,
        )


def test_padding_and_prompt_never_count():
    """Tokens outside the response mask (prompt, padding) may change freely: the loss does not move
    except through the policy's conditioning on the prompt; padding after the response never counts."""
    dm, batch = preference_batch(rows=8)
    module = preference_module(dm)
    plugin = _plugin(0.3)
    before = plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=None
    )["loss"]
    changed = {k: v.clone() for k, v in batch.items()}
    for side in ("chosen", "rejected"):
        pad = changed[f"{side}_attention"] == 0
        assert pad.any()
        changed[f"{side}_ids"][pad] = 7  # a content token where the padding was
    after = plugin.objective_terms(
        module=module, batch=changed, outputs=module.outputs(changed), ctx=None
    )["loss"]
    assert_close(after, before, atol=1e-6, rtol=0)


def test_refuses_non_preference_outputs():
    with pytest.raises(ValueError, match="robust-dpo: needs a preference task"):
        _plugin(0.1).objective_terms(
            module=None, batch={}, outputs={"logits": torch.zeros(2, 3)}, ctx=None
        )


# -- the paper's effect -------------------------------------------------------------------------------
def test_beats_dpo_on_ranking_under_30_percent_flips(tmp_path):
    """30% of the training labels flipped, ε = 0.3, β = 1: on clean validation pairs rDPO ranks
    better than DPO (val/reward_acc: h > 0), on each of 3 seeds and by ≥ 0.02 on average.
    Measured (seeds 0, 1, 2): DPO 0.645 / 0.609 / 0.625, rDPO 0.695 / 0.621 / 0.668."""
    acc: dict[str, list[float]] = {"dpo": [], "rdpo": []}
    for seed in (0, 1, 2):
        for method, plugins in (("dpo", "plugins=[]"), ("rdpo", "plugins.0.epsilon=0.3")):
            over = [
                f"name={method}{seed}",
                f"seed={seed}",
                f"run_dir={tmp_path}/runs",
                "trainer.enable_progress_bar=false",
                "trainer.check_val_every_n_epoch=8",
                plugins,
            ]
            _, metrics = fit(R.load(RECIPE, over))
            acc[method].append(metrics["val/reward_acc"])
    assert all(r >= d for r, d in zip(acc["rdpo"], acc["dpo"], strict=True)), acc
    assert sum(acc["rdpo"]) / 3 >= sum(acc["dpo"]) / 3 + 0.02, acc
