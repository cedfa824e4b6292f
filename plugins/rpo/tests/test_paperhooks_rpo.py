"""Tests of ``rpo``: hand-derived values, TRL's ``sigmoid`` + ``sft`` losses, masks, the
conformance runs on the causal-LM task, and the paper's effect (chosen likelihood kept)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.preference import PreferenceObjective
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
from paperhooks_rpo import Rpo, RpoConfig, sft_term

RECIPE = Path(__file__).parents[3] / "recipes" / "rpo.yaml"
KIT = {"eta": 1.0}


def _plugin(**kw) -> Rpo:
    p = Rpo(RpoConfig(**kw))
    p.name = "rpo"
    return p


# -- the kit, on the causal-LM preference task ------------------------------------------------------------
def test_entry_point_metadata_and_recipe_round_trip():
    check_metadata(check_entry_point("rpo"), "rpo")
    check_recipe_roundtrip("rpo", {"eta": 0.2, "normalize": "mean"})
    assert not Rpo.replaces_task_loss


def test_few_steps_stay_finite(tmp_path):
    check_few_steps("rpo", KIT, tmp_path, task=PREFERENCE_TASK)


def test_resume_is_bit_identical(tmp_path):
    check_resume("rpo", KIT, tmp_path, task=PREFERENCE_TASK)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process(tmp_path):
    # atol 1e-5 as for robust-dpo: Adam's per-coordinate √v turns 1e-9 all-reduce order
    # differences into ~1e-6 on weights whose gradients are near 0
    check_ddp_equals_single("rpo", KIT, tmp_path, task=PREFERENCE_TASK, atol=1e-5)


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process(tmp_path):
    check_ddp_equals_single("rpo", {"eta": 0.2, "normalize": "mean"}, tmp_path, strategy="fsdp2",
                            task=PREFERENCE_TASK, atol=1e-5)  # fmt: skip


def test_recipe_file_validates():
    recipe = R.load(RECIPE)
    assert [p.name for p in recipe.plugins] == ["rpo"]
    assert recipe.plugins[0].config == RpoConfig(eta=1.0, normalize="sum")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"eta": -1.0}, "eta"), ({"eta": float("inf")}, "eta"), ({"eta": "1"}, "eta"), ({"normalize": "token"}, "normalize"),
])  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RpoConfig.{field}"):
        RpoConfig(**kwargs)


# -- by hand --------------------------------------------------------------------------------------------
def test_rpo_loss_by_hand():
    # The notes' check: log π(y_w) = −5, log π(y_l) = −7, reference −6 and −6, β = 0.1, η = 0.5:
    # h = (−5 + 6) − (−7 + 6) = 2;  DPO = −log σ(0.2) = log(1 + e^−0.2) = 0.598139
    # SFT = η β (−log π(y_w)) = 0.5 · 0.1 · 5 = 0.25;  total 0.848139
    # Token log-probs of y_w: [−1, −4] over 2 response tokens, a prompt token and padding (masked).
    tok_w = torch.tensor(
        [[9.0, -1.0, -4.0, 7.0]]
    )  # the 9 and 7 sit outside the mask: they never count
    mask_w = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    tok_l = torch.tensor([[0.0, -3.0, -4.0, 0.0]])
    mask_l = mask_w.clone()
    out = {
        "chosen_token_logps": tok_w * mask_w, "rejected_token_logps": tok_l, "chosen_mask": mask_w, "rejected_mask": mask_l,
        "chosen_logps": torch.tensor([-5.0]), "rejected_logps": torch.tensor([-7.0]),
        "ref_chosen_logps": torch.tensor([-6.0]), "ref_rejected_logps": torch.tensor([-6.0]),
    }  # fmt: skip
    assert_close(sft_term(tok_w, mask_w, beta=0.1, eta=0.5), torch.tensor([0.25]))
    module = preference_module(preference_batch(rows=1)[0], objective=PreferenceObjective(beta=0.1))
    dpo = module.losses({}, out)
    assert dpo.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)  # 0.598139
    sft = _plugin(eta=0.5).objective_terms(module=module, batch={}, outputs=out, ctx=None)["sft"]
    assert (dpo + sft).item() == pytest.approx(0.848139, abs=1e-6)
    # mean form: η (−(−1 − 4)/2) = 0.5 · 2.5 = 1.25 (no β)
    assert_close(sft_term(tok_w, mask_w, beta=0.1, eta=0.5, normalize="mean"), torch.tensor([1.25]))


def test_sft_gradient_by_hand():
    # ∂/∂ log π(y_w,t) of η β (−Σ_t log π(y_w,t)) = −η β on response tokens, 0 elsewhere
    tok = torch.tensor([[-2.0, -1.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    sft_term(tok, mask, beta=0.1, eta=2.0).sum().backward()
    assert_close(tok.grad, torch.tensor([[0.0, -0.2, -0.2]]))


def test_eta_zero_is_dpo_and_the_core_keeps_dpo():
    dm, batch = preference_batch(rows=8)
    module = preference_module(dm)
    out = module.outputs(batch)
    terms = _plugin(eta=0.0).objective_terms(module=module, batch=batch, outputs=out, ctx=None)
    assert set(terms) == {"sft"} and bool((terms["sft"] == 0).all())


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_equals_trl_dpo_plus_sft_on_equal_length_responses(beta):
    """TRL's loss_type "sigmoid" plus η · loss_type "sft" (the batch's mean chosen-token NLL)
    equals DPO + the ``mean`` form when every chosen response has the same length (TRL pools the
    tokens of the batch, the official OpenRLHF code averages per response; equal lengths make
    them one). The ``sum`` form is η β |y_w| times TRL's sft on such a batch."""
    dm, batch = preference_batch(rows=8, min_response=5, max_response=5)
    module = preference_module(dm, objective=PreferenceObjective(beta=beta))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    out = module.outputs(batch)
    n_tokens = out["chosen_mask"].sum(1)
    assert bool((n_tokens == n_tokens[0]).all())
    eta = 0.2
    trl_sft = trl_dpo_loss(out, beta, "sft")
    trl = trl_dpo_loss(out, beta, "sigmoid") + eta * trl_sft
    for normalize, scale in (("mean", 1.0), ("sum", beta * n_tokens[0].item())):
        ours = module.losses(batch, out) + _plugin(eta=eta, normalize=normalize).objective_terms(
            module=module, batch=batch, outputs=out, ctx=None)["sft"]  # fmt: skip
        expected = (
            trl_dpo_loss(out, beta, "sigmoid") + eta * scale * trl_sft
            if normalize == "sum"
            else trl
        )
        assert_close(ours.mean().detach(), expected, atol=1e-5, rtol=1e-6)


def test_padding_never_counts():
    dm, batch = preference_batch(rows=8)
    module = preference_module(dm)
    plugin = _plugin(eta=1.0, normalize="mean")
    before = plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=None
    )["sft"]
    changed = {k: v.clone() for k, v in batch.items()}
    pad = changed["chosen_attention"] == 0
    assert pad.any()
    changed["chosen_ids"][pad] = 7
    after = plugin.objective_terms(
        module=module, batch=changed, outputs=module.outputs(changed), ctx=None
    )["sft"]
    assert_close(after, before, atol=1e-6, rtol=0)


def test_refuses_non_preference_outputs():
    with pytest.raises(ValueError, match="rpo: needs a preference task"):
        _plugin().objective_terms(
            module=None, batch={}, outputs={"logits": torch.zeros(2, 3)}, ctx=None
        )


# -- the paper's effect -------------------------------------------------------------------------------
def _chosen_log_ratio(built) -> float:
    module = built.module.eval()
    with torch.no_grad():
        out = module.outputs(built.datamodule.val_set.tensors)
    return (out["chosen_logps"] - out["ref_chosen_logps"]).mean().item()


def test_keeps_the_likelihood_of_chosen_responses_that_dpo_lowers(tmp_path):
    """The paper's Figure 1 (right): DPO lowers log π(y_w) of the preferred responses; RPO keeps
    it. Measured on the clean validation pairs after 6 epochs, mean log π_θ(y_w) − log π_ref(y_w):
    DPO −12.4 / −12.3, RPO (η = 1, sum) +1.38 / +1.48 (seeds 0, 1)."""
    for seed in (0, 1):
        ratio = {}
        for method, plugins in (("dpo", "plugins=[]"), ("rpo", "plugins.0.eta=1.0")):
            over = [
                f"name={method}{seed}",
                f"seed={seed}",
                f"run_dir={tmp_path}/runs",
                "trainer.enable_progress_bar=false",
                "objective.eval_samples=0",
                "trainer.check_val_every_n_epoch=6",
                plugins,
            ]
            built, _ = fit(R.load(RECIPE, over))
            ratio[method] = _chosen_log_ratio(built)
        assert ratio["dpo"] < -5.0 < 0.0 < ratio["rpo"], (seed, ratio)
