"""Tests of ``ln-dpo``: values worked out by hand, TRL's ``sigmoid_norm``, masks, the kit.

LN-DPO per pair: L = −log σ(β (ℓ_w/|y_w| − ℓ_l/|y_l|)), ℓ the summed log-ratio of a response,
|y| its number of response tokens (content and EOS; never prompt or padding).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks.preference import PreferenceObjective, dpo_loss
from paperhooks.recipe import load as load_recipe
from paperhooks.testing.conformance import (
    PREFERENCE_TASK,
    PluginConformance,
    check_ddp_equals_single,
    check_few_steps,
    check_resume,
)
from paperhooks.testing.preference import preference_batch, preference_module, trl_dpo_loss
from paperhooks_ln_dpo import LnDpo, LnDpoConfig, ln_dpo_loss

RECIPE = Path(__file__).parents[3] / "recipes" / "ln-dpo.yaml"


def _outputs(chosen_tok, chosen_mask, rejected_tok, rejected_mask, ref_chosen, ref_rejected):
    """A ``PreferenceModule.outputs``-like mapping from per-token log-probabilities (0 off the mask)."""
    ct, cm = torch.tensor(chosen_tok), torch.tensor(chosen_mask)
    rt, rm = torch.tensor(rejected_tok), torch.tensor(rejected_mask)
    return {
        "chosen_token_logps": ct * cm, "rejected_token_logps": rt * rm,
        "chosen_mask": cm, "rejected_mask": rm,
        "chosen_logps": (ct * cm).sum(1), "rejected_logps": (rt * rm).sum(1),
        "ref_chosen_logps": torch.tensor(ref_chosen), "ref_rejected_logps": torch.tensor(ref_rejected),
    }  # fmt: skip


class _Module:
    objective = PreferenceObjective(beta=0.1)


# -- the loss, by hand ------------------------------------------------------------------------------


def test_loss_by_hand():
    # ℓ_w = 3 over |y_w| = 3 tokens, ℓ_l = −2 over |y_l| = 4 tokens, β = 0.1:
    #   DPO:    β(ℓ_w − ℓ_l) = 0.5,                      −log σ(0.5)  = log(1 + e^−0.5)  = 0.474077
    #   LN-DPO: β(ℓ_w/3 − ℓ_l/4) = 0.1·(1 + 0.5) = 0.15, −log σ(0.15) = log(1 + e^−0.15) = 0.620957
    one = torch.tensor([1.0])
    ln = ln_dpo_loss(3 * one, -2 * one, 0 * one, 0 * one, 3 * one, 4 * one, 0.1)
    assert ln.item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-7)
    assert ln.item() == pytest.approx(0.620957, abs=1e-6)
    assert dpo_loss(3 * one, -2 * one, 0 * one, 0 * one, 0.1).item() == pytest.approx(
        0.474077, abs=1e-6
    )
    # the reference enters through the log-ratio only: shift both policy and reference
    shifted = ln_dpo_loss(-4 * one, -9 * one, -7 * one, -7 * one, 3 * one, 4 * one, 0.1)
    assert_close(shifted, ln)


def test_gradient_by_hand():
    # ∂L/∂ℓ_w = −β σ(−βh) / |y_w|,  ∂L/∂ℓ_l = +β σ(−βh) / |y_l|,  with βh = 0.15:
    #   σ(−0.15) = 0.4625702;  −0.1·0.4625702/3 = −0.0154190;  0.1·0.4625702/4 = 0.0115643
    w = torch.tensor([3.0], requires_grad=True)
    lo = torch.tensor([-2.0], requires_grad=True)
    ln_dpo_loss(
        w, lo, torch.zeros(1), torch.zeros(1), torch.tensor([3.0]), torch.tensor([4.0]), 0.1
    ).sum().backward()
    s = 1 / (1 + math.exp(0.15))
    assert w.grad.item() == pytest.approx(-0.1 * s / 3, abs=1e-8)
    assert lo.grad.item() == pytest.approx(0.1 * s / 4, abs=1e-8)
    assert w.grad.item() == pytest.approx(-0.0154190, abs=1e-7)


def test_equal_lengths_are_dpo_with_beta_over_length():
    # |y_w| = |y_l| = n: β(ℓ_w − ℓ_l)/n, i.e. DPO with β/n
    g = torch.Generator().manual_seed(0)
    w, lo, rw, rl = (torch.randn(6, generator=g) * 5 for _ in range(4))
    n = torch.full((6,), 5.0)
    assert_close(ln_dpo_loss(w, lo, rw, rl, n, n, 0.3), dpo_loss(w, lo, rw, rl, 0.3 / 5))


def test_plugin_counts_only_response_tokens():
    # chosen: 3 response tokens then 2 pads; rejected: 4 then 1 pad. The pads carry garbage
    # log-probabilities (−50), which the mask must remove; the count is 3 and 4 (by hand above).
    out = _outputs(
        [[1.0, 1.0, 1.0, -50.0, -50.0]], [[1.0, 1.0, 1.0, 0.0, 0.0]],
        [[-0.5, -0.5, -0.5, -0.5, -50.0]], [[1.0, 1.0, 1.0, 1.0, 0.0]],
        [0.0], [0.0],
    )  # fmt: skip
    terms = LnDpo(LnDpoConfig()).objective_terms(module=_Module(), batch={}, outputs=out, ctx=None)
    assert list(terms) == ["loss"]
    assert terms["loss"].item() == pytest.approx(0.620957, abs=1e-6)
    # β from the config wins over objective.beta: β = 0.2 → log(1 + e^−0.3) = 0.554355
    terms = LnDpo(LnDpoConfig(beta=0.2)).objective_terms(
        module=_Module(), batch={}, outputs=out, ctx=None
    )
    assert terms["loss"].item() == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-6)


# -- TRL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["model", "none"])
def test_equals_trl_sigmoid_norm(reference):
    """TRL's DPOTrainer loss type ``sigmoid_norm`` on our per-token log-probabilities and masks."""
    dm, batch = preference_batch(rows=16, n_train=16, n_val=8, min_response=1, max_response=8)
    module = preference_module(dm, objective=PreferenceObjective(beta=0.3, reference=reference))
    with torch.no_grad():  # move the policy away from the reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = module.outputs(batch)
    assert len(set(out["chosen_mask"].sum(1).tolist())) > 2  # lengths really differ
    ours = LnDpo(LnDpoConfig()).objective_terms(module, batch, out, None)["loss"].mean()
    assert_close(ours, trl_dpo_loss(out, beta=0.3, loss_type="sigmoid_norm"), atol=1e-6, rtol=1e-6)
    assert abs(ours.item() - trl_dpo_loss(out, beta=0.3).item()) > 1e-3  # and not DPO


def test_padding_ids_change_nothing_and_precomputed_reference_works():
    dm, batch = preference_batch(rows=8, n_train=16, n_val=8)
    module = preference_module(dm)
    plugin = LnDpo(LnDpoConfig())
    out = module.outputs(batch)
    loss = plugin.objective_terms(module, batch, out, None)["loss"]
    # the lengths are the response tokens (content + EOS) = attention length − prompt length
    assert_close(out["chosen_mask"].sum(1), (batch["chosen_attention"].sum(1) - 2).float())
    scrambled = {k: v.clone() for k, v in batch.items()}
    for side in ("chosen", "rejected"):
        scrambled[f"{side}_ids"][batch[f"{side}_attention"] == 0] = 7
    again = plugin.objective_terms(module, scrambled, module.outputs(scrambled), None)["loss"]
    assert_close(again, loss)
    # with reference 'none' the log-ratio is the log-probability itself
    free = preference_module(dm, objective=PreferenceObjective(reference="none"))
    free.model.load_state_dict(module.model.state_dict())
    o = free.outputs(batch)
    manual = -torch.nn.functional.logsigmoid(
        0.1
        * (
            o["chosen_logps"] / o["chosen_mask"].sum(1)
            - o["rejected_logps"] / o["rejected_mask"].sum(1)
        )
    )
    assert_close(plugin.objective_terms(free, batch, o, None)["loss"], manual)


def test_refuses_a_task_without_preference_outputs():
    with pytest.raises(ValueError, match="ln-dpo needs a preference task"):
        LnDpo(LnDpoConfig()).objective_terms(
            module=_Module(), batch={}, outputs={"logits": torch.zeros(2, 3)}, ctx=None
        )


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), "1", True])
def test_config_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="LnDpoConfig.beta"):
        LnDpoConfig(beta=beta)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["ln-dpo"]
    assert recipe.data.config.length_bias > 0


# -- the conformance kit, on the preference task --------------------------------------------------------


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip; runs on the causal-LM preference task."""

    name = "ln-dpo"
    plugin_config = {}

    def test_family_properties_hold(self) -> None:
        # the kit's objective check feeds digits logits; LN-DPO needs preference outputs, so
        # the same properties (named [B] terms, finite, finite gradients) are checked here
        dm, batch = preference_batch(rows=8, n_train=16, n_val=8)
        module = preference_module(dm)
        terms = LnDpo(LnDpoConfig()).objective_terms(module, batch, module.outputs(batch), None)
        assert set(terms) == {"loss"} and terms["loss"].shape == (8,)
        assert bool(torch.isfinite(terms["loss"]).all())
        terms["loss"].sum().backward()
        assert all(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in module.model.parameters()
        )

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        check_few_steps(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        check_resume(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        check_ddp_equals_single(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    @pytest.mark.slow
    def test_two_fsdp2_processes_equal_one(self, tmp_path: Path) -> None:
        check_ddp_equals_single(
            self.name, self.plugin_config, tmp_path, "fsdp2", task=PREFERENCE_TASK
        )
