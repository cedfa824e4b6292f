"""Whole runs: bit-identical resume, N processes = 1 process, and the paper's effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.tasks import build_datamodule
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import assert_nested_close
from paperhooks_kernel_balancing import KernelBalancing


def _fit(raw, resume=None):
    return fit(R.validate(raw), resume=None if resume is None else str(resume))


def test_resume_from_a_mid_run_step_is_bit_identical_and_does_not_refit(
    tmp_path, make_recipe, fast, monkeypatch
):
    # 881 observed pairs / batch 256 = 3 steps an epoch: step 8 is inside the third epoch
    raw = make_recipe(
        tmp_path / "runs",
        [{"name": "kernel-balancing", **fast}],
        name="full",
        trainer={"max_steps": 16, "checkpoint_every_n_steps": 8, "limit_val_batches": 0},
    )
    full, _ = _fit(raw)
    end, mid = load_checkpoint(full.run_dir), load_checkpoint(full.run_dir, "step8.ckpt")
    assert mid["global_step"] == 8 and end["global_step"] == 16
    (saved,) = mid["paperhooks"]["plugins"]
    n_observed = len(build_datamodule("synthetic-recsys", None, seed=0).train_set)
    assert saved["name"] == "kernel-balancing" and saved["state"]["weights"].shape == (n_observed,)
    assert not torch.equal(
        mid["state_dict"]["model.user.weight"], end["state_dict"]["model.user.weight"]
    )

    def no_refit(*args, **kwargs):
        raise AssertionError("the resumed run refitted the weights instead of loading them")

    monkeypatch.setattr(KernelBalancing, "fit", no_refit)
    resumed, _ = _fit(
        {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step8.ckpt"
    )
    again = load_checkpoint(resumed.run_dir)
    assert again["global_step"] == 16
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert_nested_equal(end["lr_schedulers"], again["lr_schedulers"], "lr_schedulers")
    assert_nested_equal(
        end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
    )


def _many_equals_one(tmp_path: Path, make_recipe, fast, strategy: str) -> None:
    raw = make_recipe(
        tmp_path / "runs",
        [{"name": "kernel-balancing", **fast, "inverse_propensity": True}],
        trainer={"max_steps": 6, "limit_val_batches": 0},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(
            path,
            [f"name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}"],
            cwd=tmp_path,
        )
    )
    assert one["global_step"] == many["global_step"] == 6
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
    assert_nested_close(
        one["paperhooks"]["plugins"],
        many["paperhooks"]["plugins"],
        "plugin states",
        atol=1e-6,
        rtol=1e-5,
    )
    weights = one["paperhooks"]["plugins"][0]["state"]["weights"]
    assert not torch.equal(weights, torch.ones_like(weights))  # the runs did fit weights


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_global_batch(tmp_path, make_recipe, fast):
    _many_equals_one(tmp_path, make_recipe, fast, "ddp")


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process_on_the_global_batch(tmp_path, make_recipe, fast):
    _many_equals_one(tmp_path, make_recipe, fast, "fsdp2")


def test_kernel_balancing_lowers_the_error_on_all_pairs_below_the_naive_loss(tmp_path, make_recipe):
    """The paper's claim, in direction: on ratings missing not at random, weighting the
    observed pairs by kernel-balancing weights lowers the MSE over *all* pairs.

    synthetic-recsys defaults (60 × 60 pairs, ~25% observed, exposure rising with the rating),
    MF rank 2 + biases, Adam lr 0.03, weight decay 0.01, cosine, batch 256, 300 steps; the
    same data, initialization and batches with and without the plugin.
    """
    plugin = {"name": "kernel-balancing", "feature_steps": 150, "fit_steps": 150}
    naive, balanced = [], []
    for seed in range(3):
        naive.append(_fit(make_recipe(tmp_path, [], name=f"naive{seed}", seed=seed))[1]["val/mse"])
        balanced.append(
            _fit(make_recipe(tmp_path, [plugin], name=f"kb{seed}", seed=seed))[1]["val/mse"]
        )
    # measured (torch 2.14.1, CPU): naive 0.905, 0.975, 1.046; kernel balancing 0.701, 0.783,
    # 0.771 (ratios 0.77, 0.80, 0.74). Asserted with margin: each seed < 0.9×, mean < 0.85×.
    assert all(b < 0.9 * n for b, n in zip(balanced, naive, strict=True)), (balanced, naive)
    assert sum(balanced) < 0.85 * sum(naive), (balanced, naive)
