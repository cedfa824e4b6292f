"""ctrl-u through the paperhooks conformance kit, plus the FSDP2 run next to the DDP one."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from paperhooks.testing import assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import PluginConformance, assert_nested_close, tiny_recipe

NAME = "ctrl-u"
#: input noise makes the two passes differ without dropout, which the kit's multi-process runs
#: turn off; drawn for the global batch from the step generator, so 2 processes see what 1 sees
CONFIG = {"u_scale": 1.0, "input_noise": 0.3}


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round trip, sample-weighting and objective properties,
    a few steps, bit-identical resume (with dropout: the second pass draws from the RNG)."""

    name = NAME
    plugin_config = CONFIG

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        # one single-process run, compared with 2 processes under ddp and under fsdp2
        raw = tiny_recipe(
            [{"name": NAME, **CONFIG}],
            run_dir=tmp_path / "runs",
            trainer={"limit_val_batches": 0},
            batch_size=64,
            dropout=0.0,
        )
        path = tmp_path / "recipe.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
        one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
        for strategy in ("ddp", "fsdp2"):
            overrides = [f"name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}"]
            many = load_checkpoint(fit_cli(path, overrides, cwd=tmp_path))
            assert one["global_step"] == many["global_step"] == 6, strategy
            assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
            assert_nested_close(
                one["paperhooks"]["plugins"],
                many["paperhooks"]["plugins"],
                strategy,
                atol=1e-6,
                rtol=1e-5,
            )
