"""A run stopped at any step and resumed ends bit-identical to one that never stopped."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import write_recipe
from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.testing import assert_nested_equal, assert_states_close, load_checkpoint

# 1437 training digits / batch 128 = 11 full batches an epoch.
RECIPE = """
seed: 5
name: resume
model: {name: mlp, hidden: [32], dropout: 0.2}
data: {name: digits, batch_size: 128, label_noise: {kind: symmetric, rate: 0.2}}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9, scheduler: cosine}
trainer: {max_steps: 20, enable_progress_bar: false}
plugins:
  - {name: loss-reweighting, burnin_steps: 3}
  - {name: loss-rank}
  - {name: step-pruning, final: 0.6, every: 2}
"""


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _same_end(a, b):
    assert a["global_step"] == b["global_step"] == 20
    assert_states_close(a["state_dict"], b["state_dict"], atol=0)
    assert_nested_equal(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_nested_equal(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert_nested_equal(a["paperhooks"]["plugins"], b["paperhooks"]["plugins"], "plugins")
    assert a["paperhooks"]["sparsity"] == b["paperhooks"]["sparsity"] > 0.5


def test_resume_from_any_step_is_bit_identical(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "r.yaml", RECIPE + f"run_dir: {tmp_path}/runs\n")
    full, _ = fit(R.load(path, ["name=full", "trainer.checkpoint_every_n_steps=5"]))
    end = load_checkpoint(full.run_dir)
    for stop in (5, 15):  # step 15 is in the middle of the second epoch
        ckpt = full.run_dir / "checkpoints" / f"step{stop}.ckpt"
        mid = load_checkpoint(full.run_dir, f"step{stop}.ckpt")
        assert mid["global_step"] == stop
        k = "model.1.parametrizations.weight.original"  # the pruning mask parametrizes the weight
        assert not torch.equal(mid["state_dict"][k], end["state_dict"][k])
        resumed, _ = fit(R.load(path, [f"name=resumed{stop}"]), resume=str(ckpt))
        _same_end(end, load_checkpoint(resumed.run_dir))


def test_crash_leaves_a_checkpoint_that_resumes_bit_identical(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "r.yaml", RECIPE + f"run_dir: {tmp_path}/runs\n")
    full, _ = fit(R.load(path, ["name=full"]))
    crash = path.read_text().replace("- {name: loss-rank}", "- {name: loss-rank, crash_at: 13}")
    crashing = write_recipe(tmp_path / "crash.yaml", crash)
    with pytest.raises(RuntimeError, match="crash at step 13"):
        fit(R.load(crashing, ["name=crashed"]))
    run = tmp_path / "runs" / "crashed" / "version_0"
    assert (run / "recipe.yaml").exists() and (run / "logs" / "metrics.csv").exists()
    resumed, _ = fit(
        R.load(path, ["name=resumed"]), resume=str(run / "checkpoints" / "on_exception.ckpt")
    )
    _same_end(load_checkpoint(full.run_dir), load_checkpoint(resumed.run_dir))


def test_checkpoint_holds_resolved_recipe_and_plugin_versions(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "r.yaml", RECIPE + f"run_dir: {tmp_path}/runs\n")
    built, _ = fit(R.load(path, ["trainer.max_steps=2"]))
    stored = load_checkpoint(built.run_dir)["paperhooks"]["recipe"]
    assert stored["recipe"]["trainer"]["max_steps"] == 2
    assert stored["plugin_versions"]["loss-reweighting"].startswith("paperhooks-loss-reweighting==")
    assert stored["plugin_versions"]["loss-rank"] == "paperhooks-testplugins==0.0.1"
    assert (built.run_dir / "recipe.yaml").read_text().count("loss-reweighting") >= 2


def test_resume_with_other_plugins_is_refused(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "r.yaml", RECIPE + f"run_dir: {tmp_path}/runs\n")
    built, _ = fit(R.load(path, ["trainer.max_steps=2", "name=a"]))
    with pytest.raises(Exception, match="checkpoint holds plugins .* but the recipe has"):
        fit(
            R.load(path, ["name=b", "plugins=[{name: loss-rank}]"]),
            resume=str(built.run_dir / "checkpoints" / "last.ckpt"),
        )
