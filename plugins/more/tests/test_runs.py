"""Whole runs: bit-identical resume, N processes = 1 process, and the plain-mean baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import assert_nested_close

MORE = {"name": "more", "num_tasks": 3}


def _fit(raw, resume=None):
    return fit(R.validate(raw), resume=None if resume is None else str(resume))


def test_resume_from_a_mid_run_step_is_bit_identical_including_the_gradient_ema(
    tmp_path, make_recipe
):
    # 1536 pairs / batch 96 = 16 steps an epoch: step 8 is mid-epoch, step 20 in the second
    raw = make_recipe(
        tmp_path / "runs",
        [MORE],
        name="full",
        trainer={"max_steps": 20, "checkpoint_every_n_steps": 8},
    )
    raw["optimizer"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    full, _ = _fit(raw)
    end, mid = load_checkpoint(full.run_dir), load_checkpoint(full.run_dir, "step8.ckpt")
    assert mid["global_step"] == 8 and end["global_step"] == 20
    (saved,) = mid["paperhooks"]["plugins"]
    assert saved["name"] == "more" and saved["state"]["names"] == ["task0", "task1", "task2"]
    # one EMA row per task over the head's 32 weights
    assert saved["state"]["average"].shape == (3, 32)
    assert not torch.equal(
        saved["state"]["average"], end["paperhooks"]["plugins"][0]["state"]["average"]
    )
    resumed, _ = _fit(
        {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step8.ckpt"
    )
    again = load_checkpoint(resumed.run_dir)
    assert again["global_step"] == 20
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert_nested_equal(
        end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
    )


def test_reweight_false_trains_exactly_as_the_plain_mean_over_all_pairs(tmp_path, make_recipe):
    """c_t = N_t/N on the per-task means is the mean over all pairs of the global batch: the
    module's own cross-entropy, −log σ(r_chosen − r_rejected), without the plugin."""
    trainer = {"max_steps": 12}
    plain, _ = _fit(make_recipe(tmp_path, [], name="plain", trainer=trainer))
    flat, _ = _fit(
        make_recipe(tmp_path, [{**MORE, "reweight": False}], name="flat", trainer=trainer)
    )
    more, _ = _fit(make_recipe(tmp_path, [MORE], name="more", trainer=trainer))
    a, b, c = (load_checkpoint(r.run_dir)["state_dict"] for r in (plain, flat, more))
    assert_states_close(a, b, atol=1e-6, rtol=1e-5)
    assert (a["model.head.weight"] - c["model.head.weight"]).abs().max() > 1e-3  # MORE does differ


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_global_batch(tmp_path, make_recipe):
    raw = make_recipe(tmp_path / "runs", [MORE], trainer={"max_steps": 6})
    path = tmp_path / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(path, ["name=ddp", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
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
    average = one["paperhooks"]["plugins"][0]["state"]["average"]
    assert average.shape == (3, 32) and bool((average.norm(dim=1) > 0).all())


def test_the_example_recipe_trains_three_steps(tmp_path):
    root = Path(__file__).resolve().parents[3]
    raw = R.load_raw(
        root / "recipes" / "more.yaml",
        [f"run_dir={tmp_path}", "trainer.max_steps=3", "trainer.limit_val_batches=2"],
    )
    built, metrics = _fit(raw)
    assert load_checkpoint(built.run_dir)["global_step"] == 3
    logged = {"val/rm_ece_bin5", "val/rm_ece_bin10", "val/rm_ece_bin20", "more/lambda_task1"}
    assert logged <= set(metrics)
