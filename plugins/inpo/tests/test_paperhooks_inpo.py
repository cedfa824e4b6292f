"""Tests of ``inpo``: the conformance kit on the preference task, Eq. 8 by hand, the loss's
minimizer against the closed-form OMD step (Eq. 5), snapshots and resume, and the paper's
effect: exploitability falls on a cyclic preference where DPO does not move."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from paperhooks.recipe import load as load_recipe
from paperhooks.testing import load_checkpoint
from paperhooks.testing.conformance import (
    PREFERENCE_TASK,
    PluginConformance,
    check_ddp_equals_single,
    check_few_steps,
    check_resume,
)
from paperhooks.testing.preference import preference_batch
from paperhooks_inpo import (
    InpoConfig,
    exploitability,
    inpo_loss,
    log_ratio_h,
    omd_step,
    on_policy_weights,
    win_rates,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "inpo.yaml"
#: snapshots every 4 steps, so the kit's runs (6-16 steps) cross several iterations, and
#: the resume check (stop at 13 of 16) restarts between snapshots 12 and 16
#: on-policy weights are checked under DDP on the tabular fixture
#: (test_two_processes_tabular_equal_one); on the causal LM whole-sequence products
#: π_t(y_w)π_t(y_l) put nearly all weight on one pair
CONFIG = {"eta": 0.5, "iteration_steps": 4}


class TestConformance(PluginConformance):
    """The kit, trained on the preference task (a 1-layer GPT-2)."""

    name = "inpo"
    plugin_config = CONFIG

    task = PREFERENCE_TASK  # the kit's objective check and runs on the preference task

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        check_few_steps(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        check_resume(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        # SGD instead of the task's Adam: GPT-2's key biases get a gradient that is 0 up to
        # rounding (softmax ignores them); INPO's loss scale puts that noise above Adam's ε,
        # which normalizes it into 1e-5-size steps that differ between 1 and 2 processes
        task = {**PREFERENCE_TASK, "optimizer": {"name": "sgd", "lr": 0.001}}
        check_ddp_equals_single(self.name, self.plugin_config, tmp_path, task=task)

    @pytest.mark.slow
    def test_two_fsdp2_processes_equal_one(self, tmp_path: Path) -> None:
        # the same under FSDP2, with a snapshot (step 4 of 6): policy and π_t are sharded alike,
        # so snapshot_reference copies shard to shard; the π_ref copy stays whole on each rank
        task = {**PREFERENCE_TASK, "optimizer": {"name": "sgd", "lr": 0.001}}
        check_ddp_equals_single(self.name, self.plugin_config, tmp_path, "fsdp2", task=task)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["inpo"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"eta": 0.0}, "eta"), ({"tau": -1.0}, "tau"), ({"iteration_steps": 0}, "iteration_steps"),
     ({"on_policy_weights": 1}, "on_policy_weights")],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"InpoConfig.{field}"):
        InpoConfig(**kwargs)


def test_defaults_are_the_papers():
    cfg = InpoConfig()
    assert cfg.eta == 0.005 and cfg.tau_value == pytest.approx(0.005 / 3)  # §4.1: τ = η/3
    assert 1 / (2 * cfg.eta) == pytest.approx(100.0)  # the target of Eq. 8


# -- by hand ------------------------------------------------------------------------------------------
def test_loss_by_hand():
    # π(y_w) = 0.5, π(y_l) = 0.25: log-ratio ln 2. π_ref: 0.2 vs 0.4: −ln 2. π_t: 0.6 vs 0.2: ln 3.
    # η = 1, τ = 1/3 (τ/η = 1/3): h = ln 2 + (1/3) ln 2 − (2/3) ln 3
    #   = 0.924196 − 0.732408 = 0.191788;  L = (0.191788 − 1/2)² = 0.094994
    t = lambda x: torch.tensor([math.log(x)], dtype=torch.float64)  # noqa: E731
    h = log_ratio_h(t(0.5), t(0.25), t(0.2), t(0.4), t(0.6), t(0.2), eta=1.0, tau=1 / 3)
    assert float(h) == pytest.approx(4 / 3 * math.log(2) - 2 / 3 * math.log(3), abs=1e-12)
    assert float(h) == pytest.approx(0.191788, abs=1e-6)
    assert float(inpo_loss(h, 1.0)) == pytest.approx(0.094994, abs=1e-6)
    # τ = 0 ("w/o KL"): h = ln 2 − ln 3 = −0.405465, L = (−0.405465 − 1/2)² = 0.819867
    h0 = log_ratio_h(t(0.5), t(0.25), t(0.2), t(0.4), t(0.6), t(0.2), eta=1.0, tau=0.0)
    assert float(inpo_loss(h0, 1.0)) == pytest.approx(0.819867, abs=1e-6)


def test_on_policy_weights_by_hand():
    # π_t products 0.5·0.3 = 0.15 and 0.2·0.1 = 0.02, mean 1: 2·0.15/0.17 = 1.764706, 0.235294
    w = on_policy_weights(torch.tensor([0.5, 0.2]).log(), torch.tensor([0.3, 0.1]).log())
    assert w.tolist() == pytest.approx([1.764706, 0.235294], abs=1e-6)


def test_exploitability_by_hand():
    # cyclic, 3 responses: 0 ≻ 1, 1 ≻ 2, 2 ≻ 0 (P(y ≻ y) = 1/2). π = (1/2, 1/2, 0):
    # P(0 ≻ π) = ½·½ + ½·1 = 0.75, P(1 ≻ π) = ½·0 + ½·½ = 0.25, P(2 ≻ π) = ½·1 + ½·0 = 0.5
    dm, _ = preference_batch(
        "tabular-preferences", rows=1, prompts=1, responses=3, preference="cyclic"
    )
    P = dm.preference_matrix
    pi = torch.tensor([[0.5, 0.5, 0.0]])
    assert win_rates(pi, P).tolist() == [[0.75, 0.25, 0.5]]
    assert exploitability(pi, P).tolist() == [0.25]
    assert float(exploitability(torch.full((1, 3), 1 / 3), P)) == pytest.approx(
        0.0, abs=1e-7
    )  # Nash


def test_minimizer_of_the_loss_is_the_omd_step():
    """Prop. 6: minimizing Eq. 8 over pairs drawn from π_t (here: every pair, weighted by
    π_t(y_w)π_t(y_l)) gives Eq. 5's π_{t+1} on a tabular softmax policy."""
    dm, _ = preference_batch(
        "tabular-preferences", rows=1, prompts=3, responses=5, preference="cyclic"
    )
    rows, P = dm.train_set.tensors, dm.preference_matrix.double()
    p, w, lo = rows["prompt"], rows["chosen_ids"][:, 1], rows["rejected_ids"][:, 1]
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, generator=g, dtype=torch.float64).log_softmax(-1)
    snap = (ref + 0.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)).log_softmax(-1)
    eta, tau = 0.7, 0.7 / 3
    theta = snap.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)
    weights = torch.stack(
        [on_policy_weights(snap[q, w[p == q]], snap[q, lo[p == q]]) for q in range(3)]
    ).flatten()

    def closure():
        opt.zero_grad()
        lp = theta.log_softmax(-1)
        h = log_ratio_h(
            lp[p, w], lp[p, lo], ref[p, w], ref[p, lo], snap[p, w], snap[p, lo], eta, tau
        )
        loss = (weights * inpo_loss(h, eta)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    target = omd_step(snap, ref, win_rates(snap.exp(), P), eta, tau)
    torch.testing.assert_close(theta.detach().log_softmax(-1), target, atol=1e-6, rtol=0)


def test_terms_on_a_preference_module():
    """On the causal-LM task, at π = π_t = π_ref (step 0): h = 0 on every pair, so the loss is
    (0 − 1/(2η))² = 1 for η = 0.5, whatever the padding; gradients reach the policy only."""
    from paperhooks.context import StepContext
    from paperhooks.preference import PreferenceObjective
    from paperhooks.testing.preference import preference_module
    from paperhooks_inpo import Inpo

    dm, batch = preference_batch(rows=8)
    module = preference_module(dm)
    plugin = Inpo(InpoConfig(eta=0.5))
    plugin.lifecycle_setup(module=module, ctx=StepContext())
    terms = plugin.objective_terms(
        module=module, batch=batch, outputs=module.outputs(batch), ctx=StepContext()
    )
    assert list(terms) == ["loss"] and terms["loss"].shape == (8,)
    torch.testing.assert_close(terms["loss"], torch.ones(8), atol=1e-5, rtol=0)
    terms["loss"].mean().backward()
    assert all(p.grad is None for p in plugin.reference.parameters())
    assert all(p.grad is None for p in module.reference_model.parameters())
    assert any(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.model.parameters()
    )
    other = preference_module(dm, objective=PreferenceObjective(reference="none"))
    with pytest.raises(ValueError, match="reference 'model'"):
        Inpo(InpoConfig()).lifecycle_setup(module=other, ctx=StepContext())


# -- snapshots ----------------------------------------------------------------------------------------
def tabular(seed: int, run_dir: Path, plugins: list, **trainer) -> dict:
    return {
        "seed": seed, "name": "tabular", "run_dir": str(run_dir),
        "model": {"name": "tabular-policy", "init": "random", "scale": 1.0},
        "data": {"name": "tabular-preferences", "prompts": 4, "responses": 5, "preference": "cyclic", "batch_size": 40},
        "optimizer": {"name": "sgd", "lr": 2.0},
        "objective": {"beta": 0.1, "reference": "model"},
        "trainer": {"max_steps": 50, "check_val_every_n_epoch": 1000, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "log_every_n_steps": 5, **trainer},
        "plugins": plugins,
    }  # fmt: skip


INPO = {"name": "inpo", "eta": 1.0, "iteration_steps": 5, "on_policy_weights": True}


def _pi_ref(ckpt) -> torch.Tensor:
    (state,) = [e["state"] for e in ckpt["paperhooks"]["plugins"] if e["name"] == "inpo"]
    return state["reference"]["theta"]


def _exploit(ckpt, P) -> float:
    return float(exploitability(ckpt["state_dict"]["model.theta"].softmax(-1), P).mean())


def test_snapshots_every_k_steps_and_pi_ref_is_kept(tmp_path: Path):
    from paperhooks.testing.runs import _fit

    raw = tabular(0, tmp_path / "runs", [INPO], max_steps=7, checkpoint_every_n_steps=5)
    built, _ = _fit(raw)
    mid, end = load_checkpoint(built.run_dir, "step5.ckpt"), load_checkpoint(built.run_dir)
    theta0 = _pi_ref(mid)  # π_ref = the initial policy, never changed
    assert torch.equal(_pi_ref(end), theta0)
    # after step 5 the snapshot π_2 is the policy of step 5; at step 7 it is still that one
    assert torch.equal(mid["state_dict"]["reference_model.theta"], mid["state_dict"]["model.theta"])
    assert torch.equal(end["state_dict"]["reference_model.theta"], mid["state_dict"]["model.theta"])
    assert not torch.equal(end["state_dict"]["model.theta"], mid["state_dict"]["model.theta"])
    assert not torch.equal(theta0, mid["state_dict"]["model.theta"])


# -- the paper's effect -------------------------------------------------------------------------------
def test_exploitability_falls_where_dpo_stays(tmp_path: Path):
    """On the cyclic preference (Nash: uniform), 10 INPO iterations lower the exploitability of
    a random initial policy; DPO on the same pairs does not move it (its gradient cancels around
    the cycle)."""
    from paperhooks.testing.runs import _fit

    for seed in range(3):
        built, _ = _fit(tabular(seed, tmp_path / f"inpo{seed}", [INPO]))
        P = built.datamodule.preference_matrix
        ckpt = load_checkpoint(built.run_dir)
        before = float(exploitability(_pi_ref(ckpt).softmax(-1), P).mean())
        after = _exploit(ckpt, P)
        dpo, _ = _fit(tabular(seed, tmp_path / f"dpo{seed}", []))
        after_dpo = _exploit(load_checkpoint(dpo.run_dir), P)
        print(f"seed {seed}: initial {before:.3f}  INPO {after:.3f}  DPO {after_dpo:.3f}")
        assert after < before - 0.03, (seed, before, after)
        assert after_dpo == pytest.approx(before, abs=1e-3), (seed, before, after_dpo)


@pytest.mark.slow
def test_two_processes_tabular_equal_one(tmp_path: Path):
    """With on-policy weights (a softmax over the gathered global batch) and snapshots every 5
    steps, 2 DDP processes (20 pairs each) end where 1 process (40 pairs) ends."""
    from omegaconf import OmegaConf

    from paperhooks.testing import fit_cli

    raw = tabular(0, tmp_path / "runs", [INPO], max_steps=12)
    path = tmp_path / "tabular.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    two = load_checkpoint(
        fit_cli(path, ["name=two", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
    )
    for k in ("model.theta", "reference_model.theta"):
        torch.testing.assert_close(one["state_dict"][k], two["state_dict"][k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_pi_ref(one), _pi_ref(two), atol=0, rtol=0)
