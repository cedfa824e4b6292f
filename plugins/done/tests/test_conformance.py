"""done through the paperhooks conformance kit, alone and composed with pgd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import (
    PluginConformance,
    assert_nested_close,
    check_ddp_equals_single,
    tiny_recipe,
)

# β = 0.5 so that the running normalizer moves the coefficient within the kit's few steps.
CONFIG = {"kl_reg": 1.0, "beta": 0.5}
PGD = {"name": "pgd", "epsilon": 0.1, "step_size": 0.05, "steps": 3}


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round trip, sample-weighting properties (NaN losses raise
    naming the plugin), one epoch, bit-identical resume (log u_t included), 2 DDP processes
    equal 1 (weights and log u_t)."""

    name = "done"
    plugin_config = CONFIG


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one(tmp_path):
    check_ddp_equals_single("done", CONFIG, tmp_path, strategy="fsdp2")


# -- composed with pgd: the recipe DONE is meant for --------------------------------------------
def composed(tmp_path: Path, **kwargs) -> dict:
    return tiny_recipe([PGD, {"name": "done", **CONFIG}], run_dir=tmp_path / "runs", **kwargs)


def test_pgd_then_done_resumes_bit_identical(tmp_path):
    raw = composed(
        tmp_path,
        name="full",
        trainer={"max_steps": 16, "checkpoint_every_n_steps": 13, "limit_val_batches": 0},
    )
    full, metrics = fit(R.validate(raw))
    # both plugins acted: the attack raised the loss, the weights were not uniform and the
    # running normalizer scaled the step (c_t ≠ 1 once u_t lags the batch estimate)
    assert metrics["pgd/loss_last"] > metrics["pgd/loss_start"]
    assert metrics["done/ess_fraction"] < 1.0
    assert abs(metrics["done/coefficient"] - 1.0) > 1e-4
    end = load_checkpoint(full.run_dir)
    assert end["paperhooks"]["plugins"][1]["state"]["updates"] == 16
    resumed, _ = fit(
        R.validate({**raw, "name": "resumed"}),
        resume=str(full.run_dir / "checkpoints" / "step13.ckpt"),
    )
    again = load_checkpoint(resumed.run_dir)
    assert again["global_step"] == 16
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert_nested_equal(
        end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_pgd_then_done_on_two_processes_equals_one(tmp_path, strategy):
    raw = composed(tmp_path, trainer={"limit_val_batches": 0}, batch_size=64, dropout=0.0)
    path = tmp_path / "r.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    plain = load_checkpoint(fit_cli(path, ["name=plain", "plugins=[]"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(
            path,
            [f"name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}"],
            cwd=tmp_path,
        )
    )
    # the plugins changed training, so the equality below is not vacuous
    assert (
        max(
            (one["state_dict"][k] - plain["state_dict"][k]).abs().max().item()
            for k in one["state_dict"]
        )
        > 1e-3
    )
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
    assert_nested_close(
        one["paperhooks"]["plugins"], many["paperhooks"]["plugins"], "plugins", atol=1e-6, rtol=1e-5
    )
    assert isinstance(many["paperhooks"]["plugins"][1]["state"]["log_u"], torch.Tensor)
