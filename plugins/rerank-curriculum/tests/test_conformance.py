"""rerank-curriculum through the paperhooks conformance kit, on data that carries its keys.

The kit trains on the built-in ``digits``, whose batches have no ``rank``/``relevance``, and
the plugin refuses such batches. So the run checks below train the kit's recipe
(:func:`~paperhooks.testing.conformance.tiny_recipe`) with the data swapped for this
package's ``digits-difficulty`` (the same images plus the heuristic keys), and compare as the
kit does; the family check runs on a subclass that adds the keys to the kit's batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks.plugin import hookimpl
from paperhooks.recipe import validate
from paperhooks.run import fit
from paperhooks.testing import (
    assert_nested_equal,
    assert_states_close,
    fit_cli,
    load_checkpoint,
)
from paperhooks.testing.conformance import (
    PluginConformance,
    assert_nested_close,
    check_family,
    tiny_recipe,
)
from paperhooks_rerank_curriculum import RerankCurriculum, RerankCurriculumConfig

NAME = "rerank-curriculum"
#: the curriculum runs through epochs 0 and 1 (p = 0, then 0.5): the resume check, stopped 2
#: steps into epoch 1, crosses a change of the weights
CONFIG = {"end_of_curriculum": 2.0}


def difficulty_recipe(tmp_path: Path, name: str, **kwargs: Any) -> dict[str, Any]:
    raw = tiny_recipe([{"name": NAME, **CONFIG}], run_dir=tmp_path / "runs", name=name, **kwargs)
    raw["data"] = {**raw["data"], "name": "digits-difficulty"}
    return raw


def fit_here(raw: Mapping[str, Any], resume: Path | None = None) -> tuple[Any, dict[str, float]]:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    return fit(validate(raw), resume=None if resume is None else str(resume))


class _WithHeuristicKeys(RerankCurriculum):
    """The plugin, given batches that also carry ``rank`` (1..7) and ``relevance`` (0/1)."""

    @hookimpl
    def weighting_sample_weights(
        self, losses: torch.Tensor, batch: Mapping[str, torch.Tensor], ctx: Any
    ) -> torch.Tensor | None:
        n = losses.shape[0]
        keys = {"rank": 1 + torch.arange(n) % 7, "relevance": (torch.arange(n) % 2).float()}
        return super().weighting_sample_weights(losses, {**batch, **keys}, ctx)


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round trip, sample-weighting properties, a few steps,
    bit-identical resume, 2 processes (DDP, FSDP2) equal to 1 on the global batch."""

    name = NAME
    plugin_config = CONFIG

    def test_family_properties_hold(self) -> None:
        plugin = _WithHeuristicKeys(RerankCurriculumConfig(**CONFIG))
        plugin.name = NAME
        check_family(plugin)

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        trainer = {"max_steps": -1, "max_epochs": 1, "limit_val_batches": 1}
        built, metrics = fit_here(difficulty_recipe(tmp_path, "few-steps", trainer=trainer))
        ckpt = load_checkpoint(built.run_dir)  # weights_only=True
        assert ckpt["global_step"] == 11
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values())
        # the plugin acted: the mean weight of epoch 0 (p = 0, W = D = 1/rank) is below 1
        assert 0 < metrics[f"{NAME}/mean_weight"] < 1

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        trainer = {"max_steps": 16, "checkpoint_every_n_steps": 13, "limit_val_batches": 0}
        raw = difficulty_recipe(tmp_path, "full", trainer=trainer)
        full, _ = fit_here(raw)
        end = load_checkpoint(full.run_dir)
        mid = load_checkpoint(full.run_dir, "step13.ckpt")
        assert not all(
            torch.equal(mid["state_dict"][k], end["state_dict"][k]) for k in end["state_dict"]
        )
        resumed, _ = fit_here(
            {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step13.ckpt"
        )
        again = load_checkpoint(resumed.run_dir)
        assert again["global_step"] == 16
        assert_states_close(end["state_dict"], again["state_dict"], atol=0)
        assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
        assert_nested_equal(end["lr_schedulers"], again["lr_schedulers"], "lr_schedulers")
        assert_nested_equal(
            end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
        )

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        # one single-process run, compared with 2 processes under ddp and under fsdp2
        raw = difficulty_recipe(
            tmp_path, "ddp", trainer={"limit_val_batches": 0}, batch_size=64, dropout=0.0
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
