"""srat through the paperhooks conformance kit, plus resume from inside the counting epoch and
FSDP2; the 2-process runs are marked slow."""

from __future__ import annotations

import math

import pytest

from paperhooks.testing.conformance import PluginConformance, check_ddp_equals_single, check_resume

# Weights switch on at step 3 (the kit's runs are 6-16 steps, 11 steps an epoch); the
# separability term is on from step 0.
CONFIG = {"switch_unit": "step", "switch_at": 3}


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round trip, sample-weighting properties (NaN losses raise
    naming the plugin), a few steps, bit-identical resume from step 13 (epoch 1), 2 DDP
    processes equal 1."""

    name = "srat"
    plugin_config = CONFIG


def test_resume_inside_the_counting_epoch_is_bit_identical(tmp_path):
    # step 5 of 11: the class counts are half-gathered and must come back from the checkpoint
    check_resume("srat", CONFIG, tmp_path, stop=5, max_steps=14)


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one(tmp_path):
    check_ddp_equals_single("srat", CONFIG, tmp_path, strategy="fsdp2")


# -- with adversarial training: pgd first, then srat -----------------------------------------------
PGD = {
    "name": "pgd",
    "epsilon": 0.1,
    "step_size": 0.025,
    "steps": 3,
    "random_start": True,
    "bounds": [0.0, 1.0],
}


def _with_pgd(tmp_path, **trainer):
    from paperhooks.testing.conformance import tiny_recipe

    pytest.importorskip("paperhooks_pgd", reason="the pgd plugin is not installed")
    return tiny_recipe(
        [PGD, {"name": "srat", **CONFIG}], run_dir=tmp_path / "runs", trainer=trainer
    )


def test_after_pgd_srat_weights_and_separates_the_adversarial_batch(tmp_path):
    from paperhooks import recipe as R
    from paperhooks.run import fit
    from paperhooks.testing import load_checkpoint

    raw = _with_pgd(tmp_path, max_steps=-1, max_epochs=1, limit_val_batches=1)
    built, metrics = fit(R.validate(raw))
    assert metrics["srat/active"] == 1.0 and metrics["srat/separability"] > 0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    counts = load_checkpoint(built.run_dir)["paperhooks"]["plugins"][1]["state"]["counts"]
    assert counts.sum() == 11 * 128  # epoch 0's 11 full batches of 128, all counted


@pytest.mark.slow
def test_pgd_then_srat_on_two_processes_equals_one(tmp_path):
    from omegaconf import OmegaConf

    from paperhooks.testing import assert_states_close, fit_cli, load_checkpoint

    raw = _with_pgd(tmp_path, limit_val_batches=0)
    raw["data"]["batch_size"], raw["model"]["dropout"] = 64, 0.0  # the kit's multi-process settings
    path = tmp_path / "r.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    two = load_checkpoint(
        fit_cli(path, ["name=two", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
    )
    assert_states_close(one["state_dict"], two["state_dict"], atol=1e-6, rtol=1e-5)
    assert_states_close(
        one["paperhooks"]["plugins"][1]["state"], two["paperhooks"]["plugins"][1]["state"], atol=0
    )
