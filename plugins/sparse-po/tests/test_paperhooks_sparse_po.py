"""Tests of ``sparse-po``: hand-derived values, the DPO reduction against TRL's ``sigmoid``,
masks and padding, the refusals, the conformance runs on the causal-LM task, and the effect."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.preference import PreferenceObjective, pair_inputs
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
from paperhooks.testing.metadata import tiny_recipe
from paperhooks.testing.preference import preference_batch, preference_module, trl_dpo_loss
from paperhooks_sparse_po import (
    MaskNet,
    SparsePo,
    SparsePoConfig,
    derived_mask,
    sparse_po_loss,
    token_kl_terms,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "sparse-po.yaml"
CTX = types.SimpleNamespace(seed=0, strategy="single")


def _plugin(**kw) -> SparsePo:
    p = SparsePo(SparsePoConfig(**kw))
    p.name = "sparse-po"
    return p


def _setup(beta: float = 0.1, rows: int = 8, perturb: float = 0.0, **kw):
    dm, batch = preference_batch(rows=rows)
    module = preference_module(dm, objective=PreferenceObjective(beta=beta))
    if perturb:
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    plugin = _plugin(**kw)
    plugin.lifecycle_setup(module=module, ctx=CTX)
    return module.eval(), batch, plugin


def _loss(module, batch, plugin):
    return plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=CTX
    )["loss"]


# -- the kit, on the causal-LM preference task --------------------------------------------------------
def test_entry_point_metadata_and_recipe_round_trip():
    check_metadata(check_entry_point("sparse-po"), "sparse-po")
    check_recipe_roundtrip("sparse-po", {"mask": "derived", "l1_kl": 0.001})
    assert SparsePo.replaces_task_loss


def test_few_steps_stay_finite(tmp_path):
    check_few_steps("sparse-po", {}, tmp_path, task=PREFERENCE_TASK)


def test_resume_is_bit_identical(tmp_path):
    # the learned mask network (with its dropout) is part of the module: weights, Adam state, RNG
    check_resume("sparse-po", {"independent": True}, tmp_path, task=PREFERENCE_TASK)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process(tmp_path, strategy):
    # dropout 0: the mask's dropout draws per rank. atol 1e-5 (as robust-dpo and rpo): with Adam,
    # GPT-2's key biases have an exactly-zero true gradient, and Adam's per-coordinate √v turns
    # 1e-9 all-reduce-order differences there into ~1e-6 on the weights. Under FSDP2 the mask
    # networks (modules beside the model) are kept whole by the core, their gradients averaged
    check_ddp_equals_single(
        "sparse-po", {"dropout": 0.0}, tmp_path, strategy, task=PREFERENCE_TASK, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_derived_mask(tmp_path, strategy):
    check_ddp_equals_single(
        "sparse-po", {"mask": "derived"}, tmp_path, strategy, task=PREFERENCE_TASK, atol=1e-5
    )


def test_recipe_file_validates():
    recipe = R.load(RECIPE)
    assert [p.name for p in recipe.plugins] == ["sparse-po"]
    assert recipe.plugins[0].config == SparsePoConfig()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"mask": "random"}, "mask"), ({"l1_reward": -1.0}, "l1_reward"), ({"l1_kl": float("nan")}, "l1_kl"),
    ({"dropout": 1.0}, "dropout"), ({"init_std": -0.1}, "init_std"), ({"independent": True, "mask": "ones"}, "independent"),
])  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SparsePoConfig.{field}"):
        SparsePoConfig(**kwargs)


@pytest.mark.parametrize("reference", ["precomputed", "none"])
def test_refuses_other_reference_modes_at_setup(reference):
    dm, _ = preference_batch(rows=2)
    module = preference_module(dm, objective=PreferenceObjective(reference=reference))
    with pytest.raises(
        ValueError, match=f"objective.reference 'model'.*got objective.reference '{reference}'"
    ):
        _plugin().lifecycle_setup(module=module, ctx=CTX)


def test_refuses_the_tabular_policy():
    from paperhooks.tasks.preference import TabularPolicy

    module = types.SimpleNamespace(objective=PreferenceObjective(), model=TabularPolicy(2, 3))
    with pytest.raises(ValueError, match="needs a causal-LM policy"):
        _plugin().lifecycle_setup(module=module, ctx=CTX)


def test_refuses_a_run_through_fit_with_a_reference_free_recipe(tmp_path):
    raw = tiny_recipe([{"name": "sparse-po"}], run_dir=tmp_path, task=PREFERENCE_TASK)
    raw["objective"] = {**raw["objective"], "reference": "none"}
    with pytest.raises(ValueError, match="objective.reference"):
        fit(R.validate(raw))
    # stopped at set-up: no step's checkpoint (only the core's on_exception.ckpt, at step 0)
    ckpts = {c.name: c for c in Path(tmp_path).rglob("*.ckpt")}
    assert set(ckpts) <= {"on_exception.ckpt"}, sorted(ckpts)
    for c in ckpts.values():
        assert torch.load(c, weights_only=False)["global_step"] == 0


# -- by hand --------------------------------------------------------------------------------------------
def test_loss_by_hand():
    # One pair, 2 response tokens each (positions 1, 2; position 0 is the prompt, 3 padding).
    # r(y_w) = (0.5, −1), r(y_l) = (−2, 1); k(y_w) = (−0.2, −0.4), k(y_l) = (−0.1, −0.3)
    # m^u(y_w) = (1, 0), m^u(y_l) = (0.5, 2); m^d(y_w) = (0, 1), m^d(y_l) = (1, 1)
    # u = 1·0.5 + 0·(−1) − (0.5·(−2) + 2·1) = 0.5 − 1 = −0.5
    # d = (0·(−0.2) + 1·(−0.4)) − (−0.1 − 0.3) = −0.4 + 0.4 = 0
    # β = 2: −log σ(2·(−0.5 − 0)) = log(1 + e^1) = 1.313262
    # λ_u = 0.1: + 0.1·(1 + 2.5) = 0.35;  λ_d = 0.01: + 0.01·(1 + 2) = 0.03  → 1.693262
    # Values outside the response (99) never count.
    resp = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    r_w, r_l = torch.tensor([[99.0, 0.5, -1.0, 99.0]]), torch.tensor([[99.0, -2.0, 1.0, 99.0]])
    k_w, k_l = torch.tensor([[99.0, -0.2, -0.4, 99.0]]), torch.tensor([[99.0, -0.1, -0.3, 99.0]])
    mu_w, mu_l = torch.tensor([[9.0, 1.0, 0.0, 9.0]]), torch.tensor([[9.0, 0.5, 2.0, 9.0]])
    md_w, md_l = torch.tensor([[9.0, 0.0, 1.0, 9.0]]), torch.tensor([[9.0, 1.0, 1.0, 9.0]])
    args = (r_w, r_l, k_w, k_l, resp, resp, mu_w, mu_l, md_w, md_l, 2.0)
    assert sparse_po_loss(*args).item() == pytest.approx(math.log1p(math.e), abs=1e-6)  # 1.313262
    assert sparse_po_loss(*args, l1_reward=0.1, l1_kl=0.01).item() == pytest.approx(
        1.693262, abs=1e-6
    )


def test_token_kl_by_hand():
    # Next-token distributions over V = 2 at position 0 (predicting token 1):
    # π_ref = (0.5, 0.5), π_θ = (0.8, 0.2): k = 0.5 ln(0.8/0.5) + 0.5 ln(0.2/0.5) = 0.5 ln(0.64) = −0.223144
    ref = torch.log(torch.tensor([[[0.5, 0.5], [0.3, 0.7]]]))
    pol = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7]]]))
    k = token_kl_terms(pol, ref)
    assert_close(
        k, torch.tensor([[0.0, 0.5 * math.log(0.64)]])
    )  # position 0 holds 0; the last logits are unused
    assert_close(token_kl_terms(ref, ref), torch.zeros(1, 2))


def test_derived_mask_by_hand():
    # Layer means of the states at positions 0..3 = (1, 2, 4, 7); the response is tokens 1..3, so
    # its activations (from positions 0..2) are (1, 2, 4): z-normalizing then rescaling to [0, 1]
    # gives (a − 1)/(4 − 1) = (0, 1/3, 1). A second layer with (4, 2, 1) gives (1, 1/3, 0);
    # the mean over layers is (0.5, 1/3, 0.5). A 1-token response has no spread: mask 1.
    h1 = torch.tensor([1.0, 2.0, 4.0, 7.0]).view(1, 4, 1).expand(1, 4, 3)
    h2 = torch.tensor([4.0, 2.0, 1.0, 0.0]).view(1, 4, 1).expand(1, 4, 3)
    resp = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert_close(derived_mask([h1], resp), torch.tensor([[0.0, 0.0, 1 / 3, 1.0]]))
    assert_close(derived_mask([h1, h2], resp), torch.tensor([[0.0, 0.5, 1 / 3, 0.5]]))
    assert_close(
        derived_mask([h1], torch.tensor([[0.0, 1.0, 0.0, 0.0]])),
        torch.tensor([[0.0, 1.0, 0.0, 0.0]]),
    )


def test_mask_net_by_hand():
    # 1 layer, H = 2. LayerNorm(h) of (3, 1) is (1, −1) (ε ≈ 0); w = (2, 0.5), b = 0.25:
    # ReLU(2 − 0.5 + 0.25) = 1.75; mixer c = 1 (1/L): m = 1.75. For (1, 3): ReLU(−2 + 0.5 + 0.25) = 0.
    net = MaskNet(2, 1, dropout=0.0, eps=1e-12)
    net.reset(torch.Generator().manual_seed(0))
    assert net.mixer.weight.item() == 1.0 and net.per_layer[0].bias.item() == 0.0
    with torch.no_grad():
        net.per_layer[0].weight.copy_(torch.tensor([[2.0, 0.5]]))
        net.per_layer[0].bias.fill_(0.25)
    out = net([torch.tensor([[[3.0, 1.0], [1.0, 3.0]]])])
    assert_close(out, torch.tensor([[1.75, 0.0]]))


@pytest.mark.parametrize("mask", ["learned", "derived", "ones"])
def test_policy_equal_to_reference_gives_log_2(mask):
    # r_t = 0 and k_t = 0 on every token, so u = d = 0 whatever the masks: −log σ(0) = log 2
    module, batch, plugin = _setup(mask=mask, l1_reward=0.0)
    assert_close(_loss(module, batch, plugin), torch.full((8,), math.log(2.0)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_reward_mask_one_and_kl_mask_zero_is_dpo_equal_to_trl(beta):
    """m^u ≡ 1, m^d ≡ 0 reduces SparsePO to DPO: equal to TRL's ``sigmoid`` on our log-probs."""
    module, batch, plugin = _setup(beta=beta, perturb=0.05, mask="ones")
    out = module.outputs(batch)
    r_w = out["chosen_token_logps"] - out["ref_chosen_token_logps"]
    r_l = out["rejected_token_logps"] - out["ref_rejected_token_logps"]
    one_w, one_l = out["chosen_mask"], out["rejected_mask"]
    k = torch.randn(2, *r_w.shape)  # any KL terms: their mask is 0
    ours = sparse_po_loss(
        r_w, r_l, k[0], k[1], one_w, one_l, one_w, one_l, 0 * one_w, 0 * one_l, beta
    )
    assert_close(ours.mean(), trl_dpo_loss(out, beta, "sigmoid"), atol=1e-5, rtol=1e-6)
    assert_close(ours, module.losses(batch, out), atol=1e-6, rtol=1e-6)


def test_kl_term_of_the_plugin_matches_its_definition():
    # mask "ones": u − d = DPO's h − Σ_t k_t(y_w) + Σ_t k_t(y_l), with k from the full distributions
    module, batch, plugin = _setup(beta=0.5, perturb=0.05, mask="ones")
    out = module.outputs(batch)
    ids, attention, resp = pair_inputs(batch)
    with torch.no_grad():
        pol = torch.softmax(
            module.model.lm(input_ids=ids, attention_mask=attention).logits[:, :-1], -1
        )
        ref = torch.softmax(
            module.reference_model.lm(input_ids=ids, attention_mask=attention).logits[:, :-1], -1
        )
    kl = (ref * (ref.log() - pol.log())).sum(
        -1
    )  # KL(π_ref ‖ π_θ) at positions predicting tokens 1..T−1
    seq_kl = (kl * resp[:, 1:]).sum(1)
    b = batch["chosen_ids"].shape[0]
    h = (out["chosen_logps"] - out["ref_chosen_logps"]) - (
        out["rejected_logps"] - out["ref_rejected_logps"]
    )
    expected = -torch.nn.functional.logsigmoid(0.5 * (h + seq_kl[:b] - seq_kl[b:]))
    assert_close(_loss(module, batch, plugin), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"mask": "learned", "independent": True}, {"mask": "derived"}])
def test_padding_never_counts(kw):
    module, batch, plugin = _setup(perturb=0.05, dropout=0.0, **kw)
    before = _loss(module, batch, plugin)
    changed = {k: v.clone() for k, v in batch.items()}
    pad = changed["chosen_attention"] == 0
    assert pad.any()
    changed["chosen_ids"][pad] = 7
    changed["rejected_ids"][changed["rejected_attention"] == 0] = 5
    assert_close(_loss(module, changed, plugin), before, atol=1e-6, rtol=0)
    mu, md = plugin.masks(module, module.reference_model.lm(
        input_ids=pair_inputs(batch)[0], attention_mask=pair_inputs(batch)[1], output_hidden_states=True
    ).hidden_states[1:], pair_inputs(batch)[2])  # fmt: skip
    off = pair_inputs(batch)[2] == 0
    assert bool((mu[off] == 0).all()) and bool((md[off] == 0).all())


def test_learned_masks_train_with_the_policy_and_l1_pulls_them_down():
    module, batch, plugin = _setup(perturb=0.05, dropout=0.0, l1_reward=0.5, l1_kl=0.5)
    net = module.sparse_po_mask
    assert any(
        p is q for p in module.parameters() for q in net.parameters()
    )  # the optimizer sees them
    _loss(module, batch, plugin).mean().backward()
    assert net.mixer.weight.grad is not None and net.mixer.weight.grad.abs().item() > 0
    # the common mask: λ_u/2 + λ_d/2 = 0.5 per unit of ‖m‖₁; without the L1 the gradient differs by that
    g_l1 = net.mixer.weight.grad.clone()
    net.zero_grad()
    plain = _plugin(dropout=0.0)
    _loss(module, batch, plain).mean().backward()
    assert (
        g_l1 - net.mixer.weight.grad
    ).item() > 0  # the L1 term's gradient on the mixer is positive


# -- the paper's effect ---------------------------------------------------------------------------------
def test_learned_masks_raise_the_sample_reward_over_dpo_at_equal_beta(tmp_path):
    """After 3 epochs of ``recipes/sparse-po.yaml`` (β = 0.1), the mean hidden reward of 256 sampled
    validation responses, seeds 0 / 1 (/ 2, in the card): DPO 0.465 / 0.783 (/ 0.741), SparsePO
    (learned common mask) 0.787 / 0.828 (/ 0.874). The mask grows above 1 (mean 1.6–2.4): see the
    card for what that means and for the 6-epoch numbers."""
    reward = {"dpo": [], "sparse-po": []}
    for seed in (0, 1):
        for method, plugins in (("dpo", "plugins=[]"), ("sparse-po", "plugins.0.mask=learned")):
            over = [
                f"name={method}{seed}",
                f"seed={seed}",
                f"run_dir={tmp_path}/runs",
                "trainer.enable_progress_bar=false",
                "objective.eval_samples=0",
                "trainer.max_epochs=3",
                "trainer.check_val_every_n_epoch=3",
                plugins,
            ]
            built, _ = fit(R.load(RECIPE, over))
            built.module.eval()
            reward[method].append(built.module.sample_eval(256)[0])
    gain = sum(reward["sparse-po"]) / 2 - sum(reward["dpo"]) / 2
    assert gain > 0.05, reward
