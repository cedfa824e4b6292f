"""Tests of ``per-step-dpo``: the conformance kit on the preference task with step boundaries,
Q-values / advantages / first pit / prefix masks / loss worked out by hand, TRL's DPO when the
pit is the last step, rollouts independent of the batch (so of the number of processes), and
the effect against plain DPO on the synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.testing.conformance import (
    PREFERENCE_TASK,
    PluginConformance,
    check_ddp_equals_single,
    check_few_steps,
    check_resume,
)
from paperhooks.testing.preference import preference_batch, preference_module, trl_dpo_loss
from paperhooks_per_step_dpo import (
    PerStepDpo,
    PerStepDpoConfig,
    first_pit,
    per_step_dpo_loss,
    prefix_mask,
    q_values,
    step_advantages,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "per-step-dpo.yaml"
#: the kit's task with 2 steps per response (min_response is 2)
TASK = {**PREFERENCE_TASK, "data": {**PREFERENCE_TASK["data"], "steps": 2}}
CONFIG = {"best_of": 2, "rollouts": 1, "success_threshold": 0.0}


class TestConformance(PluginConformance):
    """The kit, trained on the preference task (a 1-layer GPT-2) with step boundaries."""

    name = "per-step-dpo"
    plugin_config = CONFIG

    task = TASK  # the kit's objective check and runs on the preference task

    def test_family_properties_hold(self) -> None:
        # the kit's objective check on the same task; outside a fit the plugin gets the task's
        # hidden reward (which scores its rollouts) as reward_fn
        from paperhooks.testing.conformance import check_family, make_plugin

        plugin = make_plugin(self.name, self.plugin_config)
        data = {k: v for k, v in TASK["data"].items() if k not in ("name", "batch_size")}
        plugin.reward_fn = preference_batch(TASK["data"]["name"], rows=8, **data)[0].hidden_reward
        check_family(plugin, task=TASK)

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        check_few_steps(self.name, self.plugin_config, tmp_path, task=TASK)

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        check_resume(self.name, self.plugin_config, tmp_path, task=TASK)

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        # SGD instead of the task's Adam: GPT-2's key biases have an exactly-zero true gradient
        # (softmax ignores them) whose rounding noise Adam normalizes into 1e-5-size steps that
        # differ between 1 and 2 processes. The rollouts are seeded per pair, so both runs
        # draw the same advantages.
        task = {**TASK, "optimizer": {"name": "sgd", "lr": 0.01}}
        check_ddp_equals_single(self.name, self.plugin_config, tmp_path, task=task)

    @pytest.mark.slow
    def test_two_fsdp2_processes_equal_one(self, tmp_path: Path) -> None:
        # the same under FSDP2: the rollouts call policy.lm directly, past the root module's
        # hooks; each sharded layer still gathers its own weights
        task = {**TASK, "optimizer": {"name": "sgd", "lr": 0.01}}
        check_ddp_equals_single(self.name, self.plugin_config, tmp_path, "fsdp2", task=task)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["per-step-dpo"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"best_of": 0}, "best_of"), ({"rollouts": 1.5}, "rollouts"), ({"rollout_policy": "x"}, "rollout_policy"),
     ({"success_threshold": float("nan")}, "success_threshold")],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PerStepDpoConfig.{field}"):
        PerStepDpoConfig(**kwargs)


def test_defaults_are_the_papers():
    assert PerStepDpoConfig().best_of == 5  # π̃ = BoK(π_sft), K = 5
    assert PerStepDpoConfig().rollout_policy == "reference"  # rollouts of π_sft


# -- by hand -----------------------------------------------------------------------------------------


def test_q_values_advantages_and_first_pit_by_hand():
    # Binary rewards of M·K = 2·2 rollouts per prefix (K = 2): BoK success per group, mean over M.
    # prefix 0 (V(x)): groups (0,1),(0,0) → (1 + 0)/2 = 0.5; prefix 1: (1,1),(1,0) → 1;
    # prefix 2: (0,0),(0,1) → 0.5; prefix 3: (0,0),(0,0) → 0.
    rew = torch.tensor(
        [[[0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]], dtype=torch.float32
    )
    q = q_values(rew, best_of=2)
    assert q.tolist() == [[0.5, 1.0, 0.5, 0.0]]
    # with the outcome Q_4 = r(ŷ) = 0: A = (1 − .5, .5 − 1, 0 − .5, 0 − 0) = (.5, −.5, −.5, 0)
    q = torch.cat([q, torch.zeros(1, 1)], 1)
    assert step_advantages(q).tolist() == [[0.5, -0.5, -0.5, 0.0]]
    # Q over steps 1..4 = (1, .5, 0, 0): the first lowest is step 3 (1-based), not 4
    assert first_pit(q).tolist() == [3]
    # the notes' unit: Q = [.8, .8, 0, 0] after V(x) → c = 3; V(x) itself is never a step
    assert first_pit(torch.tensor([[0.0, 0.8, 0.8, 0.0, 0.0]])).tolist() == [3]


def test_prefix_mask_by_hand():
    # prompt of 2, response of 4 tokens in steps (0, 0, 1, 2), EOS, one pad
    steps = torch.tensor([[-1, -1, 0, 0, 1, 2, -1, -1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    assert prefix_mask(steps, mask, torch.tensor([1]), 3).tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]]
    assert prefix_mask(steps, mask, torch.tensor([2]), 3).tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]
    # c = L: the whole response with its EOS, never the pad after it
    assert prefix_mask(steps, mask, torch.tensor([3]), 3).tolist() == [[0, 0, 1, 1, 1, 1, 1, 0]]


def test_loss_by_hand():
    # y⁺: log π = −2, log π_ref = −3 (log-ratio +1). ŷ tokens (log π, log π_ref):
    # (−1, −1.5), (−2, −1), (−1, −0.5); prefix c = 2 → log-ratio (0.5) + (−1) = −0.5.
    # h = 1 − (−0.5) = 1.5, β = 0.5: L = −log σ(0.75) = log(1 + 0.472367) = 0.386871
    tok = torch.tensor([[-1.0, -2.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    loss = per_step_dpo_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), tok, ref, m, beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)
    assert float(loss) == pytest.approx(0.386871, abs=1e-6)


def test_whole_response_pit_is_trl_dpo():
    """When c = L on every pair the loss is DPO: equal to TRL's sigmoid loss on the same log-probs."""
    dm, batch = preference_batch(rows=8, steps=2)
    module = preference_module(dm)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = module.outputs(batch)
    c = torch.full((8,), 2)
    m = prefix_mask(batch["rejected_steps"], out["rejected_mask"], c, 2)
    assert torch.equal(m, out["rejected_mask"])
    ours = per_step_dpo_loss(out["chosen_logps"], out["ref_chosen_logps"], out["rejected_token_logps"],
                             out["ref_rejected_token_logps"], m, 0.1)  # fmt: skip
    assert_close(ours.mean(), trl_dpo_loss(out, 0.1), atol=1e-6, rtol=1e-5)


def _plugin(dm, **cfg):
    plugin = PerStepDpo(PerStepDpoConfig(**cfg))
    plugin.reward_fn = dm.hidden_reward
    return plugin


def test_terms_on_a_preference_module():
    """At π = π_ref the margin is 0: every pair's loss is log 2, whatever c and the padding;
    the gradient reaches the policy only, and c is a step."""
    dm, batch = preference_batch(rows=8, steps=2)
    module = preference_module(dm)
    plugin = _plugin(dm, **CONFIG)
    plugin.lifecycle_setup(module=module, ctx=StepContext())
    terms = plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=StepContext()
    )
    assert list(terms) == ["loss"]
    assert_close(terms["loss"], torch.full((8,), math.log(2.0)), atol=1e-6, rtol=0)
    terms["loss"].mean().backward()
    assert all(p.grad is None for p in module.reference_model.parameters())
    assert any(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.model.parameters()
    )
    est = plugin.advantages(module, batch, StepContext())
    assert est["q"].shape == (8, 3) and bool(((est["c"] >= 1) & (est["c"] <= 2)).all())
    from paperhooks.preference import PreferenceObjective

    other = preference_module(dm, objective=PreferenceObjective(reference="none"))
    with pytest.raises(ValueError, match="reference 'model'"):
        PerStepDpo(PerStepDpoConfig()).lifecycle_setup(module=other, ctx=StepContext())


def test_rollouts_do_not_depend_on_the_batch():
    """A pair's Q-values are the same in a batch of 8 and in its two halves (2 ranks' shares),
    and redrawn identically at the same step; another step draws other rollouts."""
    dm, batch = preference_batch(rows=8, steps=3, min_response=3)
    module = preference_module(dm)
    plugin = _plugin(dm, best_of=2, rollouts=2)
    ctx = StepContext(seed=3, step=5)
    whole = plugin.advantages(module, batch, ctx)
    halves = [
        plugin.advantages(module, {k: v[s] for k, v in batch.items()}, ctx)
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert torch.equal(torch.cat([h["q"] for h in halves]), whole["q"])
    assert torch.equal(plugin.advantages(module, batch, ctx)["q"], whole["q"])
    assert not torch.equal(
        plugin.advantages(module, batch, StepContext(seed=3, step=6))["q"], whole["q"]
    )


# -- the effect ----------------------------------------------------------------------------------------


def test_post_pit_steps_of_negatives_are_not_unlearned(tmp_path: Path):
    """Per-step credit assignment: DPO pushes down every step of the rejected responses, also
    those after the first pit (which can be good); per-step DPO leaves them out. After the same
    32 steps, the log-ratio log π/π_ref of the post-pit tokens is higher than under DPO on
    3 seeds (measured: −0.693/−0.227/−0.652 under DPO against −0.647/−0.212/−0.467; small
    margins, see the card). The sampled hidden reward showed no gain over DPO (card)."""
    from paperhooks.testing.runs import _fit

    torch.set_num_threads(1)
    cfg = {"best_of": 1, "rollouts": 2}
    for seed in range(3):
        runs = {}
        for label, plugins in (("dpo", []), ("psd", [{"name": "per-step-dpo", **cfg}])):
            raw = {
                "seed": seed, "name": label, "run_dir": str(tmp_path / f"{label}{seed}"),
                "model": {"name": "causal-lm", "layers": 1, "width": 32},
                "data": {"name": "synthetic-preferences", "batch_size": 32, "n_train": 256, "n_val": 32,
                         "steps": 3, "min_response": 3, "max_response": 6, "reward": "sum"},
                "optimizer": {"name": "adam", "lr": 0.003},
                "objective": {"beta": 0.1, "reference": "model"},
                "trainer": {"max_steps": 32, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                            "limit_val_batches": 0},
                "plugins": plugins,
            }  # fmt: skip
            built, _ = _fit(raw)
            runs[label] = built
        dm = runs["psd"].datamodule
        batch = dm.train_set.__getitems__(list(range(128)))
        post = {}
        for label, built in runs.items():
            module = built.module.eval()
            with torch.no_grad():
                est = _plugin(dm, **cfg).advantages(
                    module, batch, StepContext(seed=seed)
                )  # π_ref rollouts
                out = module.outputs(batch)
            st, c = batch["rejected_steps"], est["c"][:, None]
            after, pit = (st >= c) & (st >= 0), st == c - 1
            ratio = out["rejected_token_logps"] - out["ref_rejected_token_logps"]
            post[label] = float((ratio * after).sum() / after.sum())
            post[label + "_gap"] = post[label] - float((ratio * pit).sum() / pit.sum())
        print(
            f"seed {seed}: post-pit log-ratio DPO {post['dpo']:.3f}  per-step {post['psd']:.3f}; "
            f"post-pit minus pit DPO {post['dpo_gap']:.3f}  per-step {post['psd_gap']:.3f}"
        )
        assert post["psd"] > post["dpo"], (seed, post)


#: the chain task (``reward: chain``): 4-token chains, each token a step, 3/4 of the content
#: tokens valid at every (topic, position); chosen a valid chain, rejected broken at a uniform pit
CHAIN = {"name": "synthetic-preferences", "batch_size": 32, "n_train": 256, "n_val": 256, "reward": "chain",
         "steps": 4, "min_response": 4, "max_response": 4, "chain_valid": 0.75}  # fmt: skip
CHAIN_CFG = {"best_of": 5, "rollouts": 1, "success_threshold": 0.5}


def chain_run(tmp_path: Path, seed: int, label: str, plugins: list, *, max_steps: int, **data):
    """One fit on the chain task (``CHAIN`` with ``data`` overrides): a 1-layer GPT-2, Adam 3e-3,
    β = 0.1, the reference the initial policy; no validation during training."""
    from paperhooks.testing.runs import _fit

    raw = {
        "seed": seed, "name": label, "run_dir": str(tmp_path / f"{label}{seed}"),
        "model": {"name": "causal-lm", "layers": 1, "width": 32},
        "data": {**CHAIN, **data}, "optimizer": {"name": "adam", "lr": 0.003},
        "objective": {"beta": 0.1, "reference": "model"},
        "trainer": {"max_steps": max_steps, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "limit_val_batches": 0},
        "plugins": plugins,
    }  # fmt: skip
    return _fit(raw)[0]


def chain_metrics(built) -> tuple[float, float, float]:
    """(success rate of 256 sampled validation responses, P(invalid step | valid prefix) averaged
    over the 4 steps of the validation chosen chains, P(EOS | a whole valid chain))."""
    module = built.module.eval()
    dm = built.datamodule
    rows = dm.val_set.tensors
    valid = dm.reward_table[rows["prompt"]][:, :, 2:]  # [N, 4, content]
    success = module.sample_eval(256)[0]
    with torch.no_grad():
        p = module.model.lm(
            input_ids=rows["chosen_ids"], attention_mask=rows["chosen_attention"]
        ).logits.softmax(-1)
    step = p[:, 1:5, 2:]  # next-token probabilities at the 4 steps, content tokens only
    pit = float(((step * (1 - valid)).sum(-1) / step.sum(-1)).mean())
    return success, pit, float(p[:, 5, 1].mean())  # EOS after the 4th valid step


def random_pits(seed: int):
    """A replacement for ``PerStepDpo.advantages`` that draws c uniformly from 1..n_steps (a seeded
    stream): the truncation of per-step DPO without its credit assignment."""
    original = PerStepDpo.advantages
    g = torch.Generator().manual_seed(1000 + seed)

    def advantages(self, *args, **kwargs):
        est = dict(original(self, *args, **kwargs))
        n_steps = est["advantages"].shape[1]
        est["c"] = torch.randint(1, n_steps + 1, est["c"].shape, generator=g).to(est["c"].device)
        return est

    return advantages


def test_chain_task_first_pit_success_and_where_the_gain_comes_from(tmp_path: Path):
    """The paper's setting: binary correctness of a chain, negatives correct up to a pit.

    1. The first pit from π_ref's BoK rollouts is never after the true pit (the prefix through
       the pit holds an invalid step, so all its rollouts score 0 = the lowest Q) and equals it
       on most pairs (measured 0.883/0.836/0.848 of 256 training pairs; the misses are early:
       every rollout of an earlier prefix failed).
    2. After the same 32 steps (same data, order, init) per-step DPO's sampled success rate
       (val/sample_reward, 256 validation prompts) is above DPO's by > 0.1 on 3 seeds
       (measured 0.246/0.230/0.332 against 0.082/0.062/0.070; reference 0.008/0.016/0.020).
    3. Where it comes from (pinned): DPO pushes down the rejected responses' end-of-response
       token (they all end at the same position as the chosen ones), per-step DPO keeps it out
       when c < L, so P(EOS | a whole valid chain) is far higher (0.80/0.82/0.79 against
       0.47/0.26/0.29); the probability of an invalid step after a valid prefix (the pit) is the
       same within 0.03 (0.204/0.195/0.193 against 0.199/0.176/0.213). Truncating at a random
       step instead of the first pit gave nearly the same gain (card: 0.255 vs 0.279 over 10
       seeds): here the gain is mostly not the pit's credit assignment. With valid steps after
       the pit it is: ``test_with_valid_steps_after_the_pit_the_first_pit_beats_a_random_cut``."""
    torch.set_num_threads(1)
    for seed in range(3):
        runs = {
            label: chain_run(tmp_path, seed, label, plugins, max_steps=32)
            for label, plugins in (("dpo", []), ("psd", [{"name": "per-step-dpo", **CHAIN_CFG}]))
        }
        dm = runs["psd"].datamodule
        # 1. the first pit against the generator's pit (1-based step of the first invalid token)
        batch = dm.train_set.__getitems__(list(range(256)))
        with torch.no_grad():
            est = _plugin(dm, **CHAIN_CFG).advantages(
                runs["psd"].module.eval(), batch, StepContext(seed=seed)
            )
        true_pit = batch["rejected_steps"][torch.arange(256), 2 + batch["rejected_pit"]] + 1
        assert bool((est["c"] <= true_pit).all()), seed
        agree = float((est["c"] == true_pit).float().mean())
        # 2. success rate of sampled responses; 3. P(EOS | valid chain) and P(pit | valid prefix)
        m = {}
        for label, built in runs.items():
            m[label], m[label + "_pit"], m[label + "_eos"] = chain_metrics(built)
        print(
            f"seed {seed}: pit agreement {agree:.3f}; "
            + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
        )
        assert agree >= 0.75, (seed, agree)
        assert m["psd"] > m["dpo"] + 0.1, (seed, m)
        assert m["psd_eos"] > m["dpo_eos"] + 0.3, (seed, m)
        assert abs(m["psd_pit"] - m["dpo_pit"]) < 0.03, (seed, m)


def test_with_valid_steps_after_the_pit_the_first_pit_beats_a_random_cut(
    tmp_path: Path, monkeypatch
):
    """The paper's credit assignment (its §6: DPO on the whole negative also pushes down the valid
    steps after its first pit; per-step DPO puts the negative signal on the pit).
    ``chain_tail: valid``: a rejected chain is valid except at its pit. 64 steps. Against the
    same plugin with c drawn uniformly from 1..4 (``random_pits``: the same truncation, so the same
    end-of-response behaviour, P(EOS | valid chain) 0.96 for both, and no credit assignment):

    Measured (``_sweep.py 0,...,9 --tail valid --steps 64``), P(invalid step | valid prefix), lower
    is better, first pit vs random c: 0.153/0.167, 0.151/0.192, 0.128/0.170 on seeds 0–2, and
    lower on all 10 seeds (mean 0.136 vs 0.166, difference 0.030 ± 0.004); success rate
    0.367/0.305, 0.375/0.219, 0.449/0.379 on seeds 0–2 (10 seeds: 0.442 vs 0.337, higher on 8,
    tied on 2). Plain DPO: pit 0.170, success 0.104.

    Asserted on seeds 0–2: the first pit's pit probability is lower than random c's by more than
    0.015 on average and on at least 2 seeds; its success rate is higher on average.
    """
    torch.set_num_threads(1)
    psd = [{"name": "per-step-dpo", **CHAIN_CFG}]
    pits, successes = [], []
    for seed in range(3):
        first = chain_metrics(
            chain_run(tmp_path, seed, "psd", psd, max_steps=64, chain_tail="valid")
        )
        with monkeypatch.context() as patch:
            patch.setattr(PerStepDpo, "advantages", random_pits(seed))
            cut = chain_metrics(
                chain_run(tmp_path, seed, "random", psd, max_steps=64, chain_tail="valid")
            )
        print(f"seed {seed}: first pit {first}, random c {cut} (success, pit, eos)")
        pits.append(cut[1] - first[1])
        successes.append(first[0] - cut[0])
    assert sum(pits) / 3 > 0.015 and sum(d > 0 for d in pits) >= 2, pits
    assert sum(successes) / 3 > 0, successes
