"""The preference task: data with a hidden reward, policies, DPO, reference models, recipes."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from helpers import write_recipe
from paperhooks import cli
from paperhooks import recipe as R
from paperhooks.errors import PaperhooksError
from paperhooks.preference import PreferenceObjective, dpo_loss
from paperhooks.run import build_module, fit
from paperhooks.tasks import build_datamodule, build_model
from paperhooks.tasks.preference import EOS, PAD, TabularPolicy
from paperhooks.testing import assert_states_close, load_checkpoint
from paperhooks.testing.preference import preference_batch, preference_module, trl_dpo_loss

# -- the loss -------------------------------------------------------------------------------------


def test_dpo_loss_hand_derived():
    # h = (−1 − (−1.5)) − (−2 − (−1.5)) = 0.5 + 0.5 = 1;  β = 0.5:  −log σ(0.5) = log(1 + e^−0.5)
    loss = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-7)  # 0.474077
    # equal log-ratios: log 2 whatever β
    same = dpo_loss(
        torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), 7.0
    )
    assert same.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("reference", ["model", "none"])
def test_dpo_equals_trl_on_the_same_log_probabilities(reference):
    """TRL's DPOTrainer loss (type ``sigmoid``) on our per-token log-probabilities and masks."""
    dm, batch = preference_batch(rows=16, n_train=16, n_val=8)
    module = preference_module(dm, objective=PreferenceObjective(beta=0.3, reference=reference))
    with torch.no_grad():  # a trained-looking policy: move it away from the reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = module.outputs(batch)
    ours = module.losses(batch, out).mean()
    torch.testing.assert_close(ours, trl_dpo_loss(out, beta=0.3), atol=1e-6, rtol=1e-6)
    assert abs(ours.item() - math.log(2)) > 1e-3  # not the trivial value


def test_tabular_dpo_gradient_hand_derived():
    """Uniform policy = reference: h = 0, L = log 2, ∂L/∂θ_p = −β σ(0) (e_w − e_l) = −β/2 (e_w − e_l)
    (the softmax Jacobian's −π terms cancel between the two responses)."""
    dm, batch = preference_batch("tabular-preferences", rows=1, prompts=2, responses=3)
    module = preference_module(dm, model="tabular-policy", objective=PreferenceObjective(beta=0.4))
    loss = module.losses(batch, module.outputs(batch)).sum()
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    p, win, lose = batch["prompt"][0], batch["chosen_ids"][0, 1], batch["rejected_ids"][0, 1]
    expected = torch.zeros(2, 3)
    expected[p, win], expected[p, lose] = -0.2, 0.2
    torch.testing.assert_close(module.model.theta.grad, expected)


def test_padding_and_prompt_never_count():
    dm, batch = preference_batch(rows=8, n_train=16, n_val=8)
    module = preference_module(dm)
    out = module.outputs(batch)
    # the sum is over exactly the response tokens and EOS: recompute from the LM's logits
    lm = module.model.lm
    ids, att, mask = batch["chosen_ids"], batch["chosen_attention"], batch["chosen_mask"]
    logp = lm(input_ids=ids, attention_mask=att).logits.log_softmax(-1)
    manual = torch.stack([
        sum(logp[i, t - 1, ids[i, t]] for t in range(1, ids.shape[1]) if mask[i, t]) for i in range(len(ids))
    ])  # fmt: skip
    torch.testing.assert_close(out["chosen_logps"], manual, atol=1e-5, rtol=1e-5)
    assert bool((out["chosen_token_logps"][mask == 0] == 0).all())
    # other pad tokens after EOS change nothing
    scrambled = ids.clone()
    scrambled[att == 0] = 7
    again = module.outputs({**batch, "chosen_ids": scrambled})
    torch.testing.assert_close(again["chosen_logps"], out["chosen_logps"])


# -- data ------------------------------------------------------------------------------------------


def test_synthetic_pairs_follow_the_hidden_reward_and_flip_at_the_rate():
    dm = build_datamodule(
        "synthetic-preferences", {"n_train": 4000, "n_val": 500, "flip_rate": 0.3}, 1
    )
    t = dm.train_set.tensors
    differ = t["reward_chosen"] != t["reward_rejected"]  # equal rewards (same tokens) have no order
    better = t["reward_chosen"] > t["reward_rejected"]
    assert bool((better == ~t["flipped"])[differ].all()) and differ.float().mean() > 0.95
    assert abs(t["flipped"].float().mean().item() - 0.3) < 0.02
    assert not bool(dm.val_set.tensors["flipped"].any())  # validation labels are clean
    # masks: the response and its EOS, inside the attention, never the prompt
    mask, att, ids = t["chosen_mask"], t["chosen_attention"], t["chosen_ids"]
    assert bool((mask <= att).all()) and bool((mask[:, :2] == 0).all())
    assert bool((ids[att == 0] == PAD).all())
    last = att.sum(1) - 1
    assert bool((ids[torch.arange(len(ids)), last] == EOS).all())
    # the hidden reward recomputes the stored one
    content = (mask.bool() & (ids >= 2)).float()
    torch.testing.assert_close(dm.hidden_reward(t["prompt"], ids, content), t["reward_chosen"])


def test_length_bias_and_steps():
    plain = build_datamodule("synthetic-preferences", {"n_train": 2000}, 0).train_set.tensors
    biased = build_datamodule(
        "synthetic-preferences", {"n_train": 2000, "length_bias": 1.0, "steps": 2}, 0
    ).train_set.tensors

    def gap(t):
        return (t["chosen_mask"].sum(1) - t["rejected_mask"].sum(1)).mean().item()

    assert abs(gap(plain)) < 0.2 and gap(biased) > 1.0
    steps, mask = biased["chosen_steps"], biased["chosen_mask"]
    # steps cover the content tokens (not EOS) in order: 0 … then 1 …
    content = (biased["chosen_ids"] >= 2) & mask.bool()
    assert bool(((steps >= 0) == content).all())
    assert bool((steps[content].reshape(-1) <= 1).all()) and bool(
        (steps.diff(dim=1)[:, 2:] >= -2).all()
    )
    row = steps[0][content[0]]
    assert row.tolist() == sorted(row.tolist()) and row[0] == 0 and row[-1] == 1


def test_chain_reward_generator_by_hand():
    """``reward: chain``: V = 6 (content tokens 2..5), one topic, chains of 3 tokens, each
    token a step, chain_valid 0.5 → |V[k, t]| = round(0.5 · 4) = 2 valid tokens per position."""
    cfg = {"reward": "chain", "vocab_size": 6, "topics": 1, "prompt_length": 1, "min_response": 3,
           "max_response": 3, "steps": 3, "chain_valid": 0.5, "n_train": 2000, "n_val": 8, "flip_rate": 0.25}  # fmt: skip
    dm = build_datamodule("synthetic-preferences", cfg, 0)
    valid = dm.reward_table  # [1, 3, 6]
    assert valid.shape == (1, 3, 6) and valid.sum(-1).tolist() == [[2.0, 2.0, 2.0]]
    assert bool((valid[..., :2] == 0).all())  # pad and EOS are never a valid step
    good = [int(valid[0, t].nonzero()[0]) for t in range(3)]
    bad = [int((valid[0, t, 2:] == 0).nonzero()[0]) + 2 for t in range(3)]
    topic, ones = torch.zeros(1, dtype=torch.int64), torch.ones(1, 3)
    # a valid chain scores 1; one invalid step anywhere scores 0; too short (2 < min_response) 0
    assert dm.hidden_reward(topic, torch.tensor([good]), ones).tolist() == [1.0]
    for t in range(3):
        broken = list(good)
        broken[t] = bad[t]
        assert dm.hidden_reward(topic, torch.tensor([broken]), ones).tolist() == [0.0]
    short = torch.tensor([[good[0], good[1], PAD]])
    assert dm.hidden_reward(topic, short, torch.tensor([[1.0, 1.0, 0.0]])).tolist() == [0.0]
    # a sampled 4th token (sample() may write max_response + 1) is past the chain: 0
    assert dm.hidden_reward(topic, torch.tensor([good + [good[0]]]), torch.ones(1, 4)).tolist() == [
        0.0
    ]

    t = dm.train_set.tensors
    flipped = t["flipped"]
    assert abs(flipped.float().mean().item() - 0.25) < 0.03
    for side in ("chosen", "rejected"):
        ids, mask, pit = t[f"{side}_ids"], t[f"{side}_mask"], t[f"{side}_pit"]
        resp = ids[:, 1:4]
        ok = valid[0, torch.arange(3), resp].bool()  # [N, 3]: y_t ∈ V[k, t]
        content = (mask.bool() & (ids >= 2)).float()
        reward = dm.hidden_reward(t["prompt"], ids[:, 1:], content[:, 1:])
        torch.testing.assert_close(reward, t[f"reward_{side}"])
        is_chain = pit < 0
        assert bool(ok[is_chain].all()) and bool((reward[is_chain] == 1).all())  # valid chains
        broken = ~is_chain
        # before the pit every step is valid, at the pit it is not; reward 0
        pos = torch.arange(3)
        assert bool((ok | (pos >= pit[:, None]))[broken].all())
        assert not bool(ok[broken, pit[broken]].any()) and bool((reward[broken] == 0).all())
        # each token is a step: the pit step is the pit position
        assert torch.equal(t[f"{side}_steps"][broken, 1 + pit[broken]], pit[broken])
        # chosen is the valid chain except in flipped rows
        assert torch.equal(is_chain, ~flipped if side == "chosen" else flipped)
    # pits uniform over the 3 positions
    counts = torch.bincount(t["rejected_pit"][~flipped], minlength=3).float()
    assert bool(((counts / counts.sum() - 1 / 3).abs() < 0.05).all())
    # the rejected chain is drawn independently of the chosen one: its valid steps differ often
    before = (torch.arange(3) < t["rejected_pit"][:, None]) & ~flipped[:, None]
    same = (t["chosen_ids"][:, 1:4] == t["rejected_ids"][:, 1:4])[before].float().mean().item()
    assert abs(same - 0.5) < 0.05  # 2 valid tokens per position: equal half of the time
    assert not bool(dm.val_set.tensors["flipped"].any())
    # chain_tail valid: only the pit is wrong, every step after it is valid again
    tail = build_datamodule(
        "synthetic-preferences", {**cfg, "chain_tail": "valid", "flip_rate": 0.0}, 0
    ).train_set.tensors
    ok = valid[0, torch.arange(3), tail["rejected_ids"][:, 1:4]].bool()
    assert bool((ok == (torch.arange(3) != tail["rejected_pit"][:, None])).all())
    # the default reward keeps its data: chain options change nothing there
    plain = build_datamodule("synthetic-preferences", {"n_train": 64}, 0).train_set.tensors
    assert "rejected_pit" not in plain


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"chain_valid": 1.0}, r"data: chain_valid must be in \(0, 1\)"),
     ({"length_bias": 0.5}, "data: length_bias must be 0 with reward chain"),
     ({"vocab_size": 6, "chain_valid": 0.1}, r"data: chain_valid must be such that round\(chain_valid · 4 content tokens\) "
                                              r"leaves at least one valid and one invalid token per position \(it gives 0\)")],
)  # fmt: skip
def test_chain_reward_refuses_bad_options_naming_the_key(tmp_path, extra, message):
    raw = {"model": {"name": "causal-lm"}, "data": {"name": "synthetic-preferences", "reward": "chain", **extra},
           "trainer": {"max_steps": 1}}  # fmt: skip
    with pytest.raises(PaperhooksError, match=message):
        R.validate(raw)


def test_tabular_fixture():
    dm = build_datamodule("tabular-preferences", {"prompts": 3, "responses": 4}, 0)
    t = dm.train_set.tensors
    assert len(dm.train_set) == 3 * 4 * 3 // 2  # every unordered pair once, the better one chosen
    assert bool((t["reward_chosen"] > t["reward_rejected"]).all())
    cyc = build_datamodule(
        "tabular-preferences", {"prompts": 1, "responses": 5, "preference": "cyclic"}, 0
    )
    wins = torch.bincount(cyc.train_set.tensors["chosen_ids"][:, 1], minlength=5)
    assert wins.tolist() == [2, 2, 2, 2, 2]  # non-transitive: everyone beats exactly (M−1)/2
    with pytest.raises(ValueError, match="odd"):
        build_datamodule("tabular-preferences", {"responses": 4, "preference": "cyclic"}, 0)


# -- reference models --------------------------------------------------------------------------------


def test_reference_model_is_frozen_and_snapshots():
    dm, batch = preference_batch(rows=8, n_train=16, n_val=8)
    module = preference_module(dm)
    ref_before = {k: v.clone() for k, v in module.reference_model.state_dict().items()}
    opt = torch.optim.SGD(module.model.parameters(), lr=1.0)
    module.losses(batch, module.outputs(batch)).mean().backward()
    assert all(p.grad is None for p in module.reference_model.parameters())
    opt.step()
    assert_states_close(ref_before, module.reference_model.state_dict(), atol=0)
    assert module.losses(batch, module.outputs(batch)).mean().item() != pytest.approx(math.log(2))
    module.snapshot_reference()  # reference := policy: every log-ratio margin is 0
    loss = module.losses(batch, module.outputs(batch))
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))
    with pytest.raises(ValueError, match="objective.reference 'model'"):
        preference_module(dm, objective=PreferenceObjective(reference="none")).snapshot_reference()


RECIPE = """
seed: 2
model: {name: causal-lm, layers: 1, width: 32}
data: {name: synthetic-preferences, batch_size: 64, n_train: 512, n_val: 128}
optimizer: {name: adam, lr: 0.003, scheduler: cosine}
objective: {beta: 0.1}
trainer: {max_steps: 20, enable_progress_bar: false, limit_val_batches: 0}
"""


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "dpo.yaml", RECIPE + f"run_dir: {tmp_path}/runs\n")


def test_precomputed_reference_trains_like_the_reference_model(recipe):
    model, _ = fit(R.load(recipe, ["name=model"]))
    pre, _ = fit(R.load(recipe, ["name=pre", "objective.reference=precomputed"]))
    a, b = load_checkpoint(model.run_dir)["state_dict"], load_checkpoint(pre.run_dir)["state_dict"]
    policy = [k for k in a if k.startswith("model.")]
    assert_states_close({k: a[k] for k in policy}, {k: b[k] for k in policy}, atol=1e-5, rtol=1e-4)
    assert "ref_train" in b and not any(k.startswith("reference_model.") for k in b)
    assert bool(b["ref_ready"])


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_resume_in_the_middle_is_bit_identical(recipe, reference):
    """Step 13 is in the second epoch (8 batches an epoch). A precomputed reference comes back
    from the checkpoint: recomputing it from the trained policy would change the result."""
    full, _ = fit(
        R.load(
            recipe,
            [
                f"name=full-{reference}",
                f"objective.reference={reference}",
                "trainer.checkpoint_every_n_steps=13",
            ],
        )
    )
    resumed, _ = fit(
        R.load(recipe, [f"name=resumed-{reference}", f"objective.reference={reference}"]),
        resume=str(full.run_dir / "checkpoints" / "step13.ckpt"),
    )
    a, b = load_checkpoint(full.run_dir), load_checkpoint(resumed.run_dir)
    assert a["global_step"] == b["global_step"] == 20
    assert_states_close(a["state_dict"], b["state_dict"], atol=0)


def test_dpo_raises_the_hidden_reward_of_samples(recipe):
    """The effect DPO exists for, measured with the hidden reward of sampled responses: the
    trained policy against the frozen reference (the initial policy), on the same prompts."""
    for seed in (0, 1):
        built, _ = fit(
            R.load(recipe, [f"name=effect{seed}", f"seed={seed}", "trainer.max_steps=80"])
        )
        r0, _ = built.module.sample_eval(128, policy=built.module.reference_model)
        r1, _ = built.module.sample_eval(128)
        assert r1 > r0 + 0.3, (seed, r0, r1)


# -- recipes ----------------------------------------------------------------------------------------


def test_recipe_errors_name_the_objective_key(tmp_path, recipe, capsys):
    with pytest.raises(PaperhooksError, match=r"objective.beta must be > 0"):
        R.load(recipe, ["objective.beta=0"])
    with pytest.raises(PaperhooksError, match=r"objective.reference"):
        R.load(recipe, ["objective.reference=frozen"])
    digits = write_recipe(
        tmp_path / "d.yaml",
        "model: {name: mlp}\ndata: {name: digits}\nobjective: {beta: 0.1}\ntrainer: {max_steps: 1}\n"
        f"run_dir: {tmp_path}/runs\n",
    )
    with pytest.raises(PaperhooksError, match="only preference data"):
        R.load(digits)  # at validation: digits is registered as classification data
    rpo = write_recipe(
        tmp_path / "r.yaml",
        f"model: {{name: mlp}}\ndata: {{name: digits}}\nplugins: [{{name: rpo}}]\ntrainer: {{max_steps: 1}}\nrun_dir: {tmp_path}/runs\n",
    )
    refusal = r"plugins.rpo: works on preference data only; data 'digits' is classification"
    with pytest.raises(PaperhooksError, match=refusal):
        R.load(rpo)  # refused at validation (Plugin.tasks against the dataset's registered task)
    assert cli.main(["validate", str(rpo)]) != 0
    assert re.search(refusal, capsys.readouterr().err)
    # a dataset registered without its task: the same refusal when the module is built
    ok = R.validate(
        {
            **R.load_raw(rpo),
            "data": {"name": "synthetic-preferences"},
            "model": {"name": "causal-lm"},
        }
    )
    with pytest.raises(PaperhooksError, match=refusal):
        build_module(
            dataclasses.replace(ok, data=R.Section("digits", None)),
            build_datamodule("digits", None, 0).info,
        )
    wrong = write_recipe(
        tmp_path / "w.yaml",
        "model: {name: causal-lm}\ndata: {name: digits}\ntrainer: {max_steps: 1}\n",
    )
    with pytest.raises(ValueError, match="causal-lm needs preference data"):
        fit(R.load(wrong))


def test_a_saved_causal_lm_loads_by_path(tmp_path):
    dm = build_datamodule("synthetic-preferences", None, 0)
    lm = build_model("causal-lm", {"layers": 1, "width": 32}, dm.info).lm
    lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
    loaded = build_model("causal-lm", {"pretrained": str(tmp_path / "lm")}, dm.info).lm
    assert_states_close(lm.state_dict(), loaded.state_dict(), atol=0)
    with pytest.raises(ValueError, match="model.pretrained"):
        build_model("causal-lm", {"pretrained": str(tmp_path / "missing")}, dm.info)


def test_max_positions_extends_the_causal_lm_beyond_the_data_length():
    dm = build_datamodule("synthetic-preferences", None, 0)  # max_length 2 + 6 + 1 = 9
    assert build_model("causal-lm", {"layers": 1, "width": 32}, dm.info).lm.config.n_positions == 9
    policy = build_model("causal-lm", {"layers": 1, "width": 32, "max_positions": 16}, dm.info)
    assert policy.lm.config.n_positions == 16
    ids = torch.full((2, 16), 2)
    assert policy(ids, torch.ones_like(ids)).shape == (2, 16)
    with pytest.raises(
        ValueError, match=r"max_positions must be >= the data's max_length \(9\), got 4"
    ):
        build_model("causal-lm", {"max_positions": 4}, dm.info)


def test_tabular_policy_expected_reward_is_logged(tmp_path):
    path = write_recipe(
        tmp_path / "t.yaml",
        "model: {name: tabular-policy}\ndata: {name: tabular-preferences, batch_size: 8}\n"
        "optimizer: {name: sgd, lr: 20.0}\ntrainer: {max_epochs: 30, enable_progress_bar: false, check_val_every_n_epoch: 30}\n"
        f"run_dir: {tmp_path}/runs\n",
    )
    built, metrics = fit(R.load(path))
    table = built.datamodule.reward_table
    probs = built.module.model.log_probs().exp()
    assert metrics["val/expected_reward"] == pytest.approx(
        (probs * table).sum(1).mean().item(), abs=1e-6
    )
    # DPO on clean, complete preferences moves most mass to the best response of every prompt
    best, uniform = table.max(1).values.mean().item(), table.mean().item()
    assert metrics["val/expected_reward"] > uniform + 0.8 * (best - uniform)
    assert metrics["val/reward_acc"] == 1.0
    assert isinstance(built.module.model, TabularPolicy)
