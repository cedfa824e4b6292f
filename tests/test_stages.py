"""Multi-stage recipes: prune → retrain, state passed between fits, resume, many processes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import write_recipe
from paperhooks import recipe as R
from paperhooks.errors import RecipeError
from paperhooks.run import fit
from paperhooks.testing import assert_states_close, fit_cli, load_checkpoint

RECIPE = """
seed: 1
name: staged
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
trainer: {max_steps: 12, enable_progress_bar: false, limit_val_batches: 0}
stages:
  - name: prune
    plugins: [{name: one-shot-pruning, sparsity: 0.7, step: 4}]
  - name: retrain
    trainer: {max_steps: 10, checkpoint_every_n_steps: 5}
    optimizer: {lr: 0.02}
"""


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "staged.yaml", RECIPE + f"run_dir: {tmp_path}/runs\n")


def _stage(run, i, name, ckpt="last.ckpt"):
    return load_checkpoint(run / "stages" / f"{i}-{name}", ckpt)


def _masks(state):
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def _effective(state):
    """W ⊙ M per pruned layer (the weight the network uses)."""
    out = {}
    for k, m in _masks(state).items():
        layer = k.split(".parametrizations.")[0]
        out[layer] = state[f"{layer}.parametrizations.weight.original"] * m
    return out


def test_prune_then_retrain_keeps_the_masks_and_records_every_stage(recipe):
    built, metrics = fit(R.load(recipe))
    run = built.run_dir
    first, second = _stage(run, 0, "prune"), _stage(run, 1, "retrain")
    assert first["global_step"] == 12 and second["global_step"] == 10
    m1, m2 = _masks(first["state_dict"]), _masks(second["state_dict"])
    assert m1 and sorted(m1) == sorted(m2)
    for k in m1:
        assert torch.equal(m1[k], m2[k])  # the retraining stage did not change the masks
    kept = sum(int(m.sum()) for m in m1.values()) / sum(m.numel() for m in m1.values())
    assert kept == pytest.approx(0.3, abs=1e-3)
    for layer, w in _effective(second["state_dict"]).items():
        mask = second["state_dict"][f"{layer}.parametrizations.weight.0.mask"]
        assert bool((w[~mask] == 0).all())
        assert bool(
            (second["state_dict"][f"{layer}.parametrizations.weight.original"][~mask] == 0).all()
        )
    # the second stage trained: the kept weights moved
    e1, e2 = _effective(first["state_dict"]), _effective(second["state_dict"])
    assert max((e1[k] - e2[k]).abs().max().item() for k in e1) > 1e-3
    record = json.loads((run / "stages.json").read_text())
    assert [r["stage"] for r in record] == ["prune", "retrain"] and all(
        r["status"] == "done" for r in record
    )
    assert json.loads((run / "metrics.json").read_text()) == record[1]["metrics"] == metrics
    assert metrics["pruning/sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert (run / "recipe.yaml").exists() and (
        run / "stages" / "1-retrain" / "recipe.yaml"
    ).exists()


def test_the_next_stage_starts_from_the_previous_weights(recipe):
    """With a vanishing learning rate the second stage ends where the first ended: its start
    was the first stage's end (a fresh initialization would be far away)."""
    built, _ = fit(
        R.load(recipe, ["stages.1.optimizer.lr=1e-12", "stages.1.optimizer.momentum=0.0"])
    )
    e1 = _effective(_stage(built.run_dir, 0, "prune")["state_dict"])
    e2 = _effective(_stage(built.run_dir, 1, "retrain")["state_dict"])
    for k in e1:
        torch.testing.assert_close(e1[k], e2[k], atol=1e-8, rtol=0)


@pytest.mark.parametrize(("stage", "ckpt"), [("0-prune", "last.ckpt"), ("1-retrain", "step5.ckpt")])
def test_resume_between_and_inside_stages_is_bit_identical(recipe, stage, ckpt):
    full, _ = fit(R.load(recipe, ["name=full", "stages.0.trainer.checkpoint_every_n_steps=6"]))
    resumed, _ = fit(
        R.load(recipe, ["name=resumed"]),
        resume=str(full.run_dir / "stages" / stage / "checkpoints" / ckpt),
    )
    a, b = _stage(full.run_dir, 1, "retrain"), _stage(resumed.run_dir, 1, "retrain")
    assert a["global_step"] == b["global_step"] == 10
    assert_states_close(a["state_dict"], b["state_dict"], atol=0)
    record = json.loads((resumed.run_dir / "stages.json").read_text())
    assert record[1]["status"] == "done"
    assert record[0]["status"] == (
        "done" if stage == "0-prune" else "skipped (resumed at a later stage)"
    )


def test_stage_errors_name_the_stage(recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[1\] \(retrain\): optimizer: lr must be > 0"):
        R.load(recipe, ["stages.1.optimizer.lr=-1"])
    with pytest.raises(RecipeError, match=r"stages\[1\] \(retrain\): unknown keys \['dataset'\]"):
        R.load(recipe, ["stages.1.dataset={name: digits}"])
    for key, value in (("name", "regression"), ("val_fraction", 0.5)):
        with pytest.raises(
            RecipeError, match=rf"stages\[1\] \(retrain\): data.{key} cannot change"
        ):
            R.load(recipe, [f"stages.1.data={{{key}: {value}}}"])
    with pytest.raises(RecipeError, match=r"stages\[1\] \(retrain\): data: .*train_classes"):
        R.load(recipe, ["stages.1.data={train_classes: [11]}"])
    with pytest.raises(RecipeError, match=r"stages\[0\] \(prune\): .*no-such-plugin"):
        R.load(recipe, ["stages.0.plugins=[{name: no-such-plugin}]"])
    with pytest.raises(RecipeError, match="must be unique"):
        R.load(recipe, ["stages.1.name=prune"])
    with pytest.raises(RecipeError, match="sharded strategy 'fsdp2'"):
        R.load(recipe, ["trainer.strategy=fsdp2", "trainer.devices=2"])
    with pytest.raises(RecipeError, match="resumes from a checkpoint under RUN/stages"):
        fit(R.load(recipe), resume=str(tmp_path / "x.ckpt"))


def test_a_stage_may_train_on_other_classes_of_the_one_split(recipe):
    """``data`` merges like the other sections: stage 1 trains on digit 3 only, on rows of the
    recipe's split; a stage whose data changes the model's input is refused by name."""
    built, _ = fit(R.load(recipe, ["stages.1.data={train_classes: [3], batch_size: 8}"]))
    dm = built.datamodule
    assert set(dm.train_set.tensors["target"].tolist()) == {3}
    assert dm.batch_size == 8
    first = R.load(recipe).stages[0][1]
    from paperhooks.tasks import build_datamodule

    whole = build_datamodule("digits", first.data.config, first.seed)
    assert torch.equal(dm.val_set.tensors["input"], whole.val_set.tensors["input"])
    with pytest.raises(RecipeError, match="does not take the weights the stage before passed on"):
        fit(R.load(recipe, ["stages.1.data={image_size: 4}", "name=shape"]))


@pytest.mark.slow
def test_stages_on_two_processes_equal_one_process(recipe, tmp_path):
    # the retrain stage trains on digits 3-5 only and validates on all: its split metrics too
    # (the run's metrics.json is the last stage's)
    retrain = [
        "stages.1.data={train_classes: [3, 4, 5]}",
        "stages.1.trainer={max_steps: 10, checkpoint_every_n_steps: 5, limit_val_batches: 1.0}",
    ]
    one = fit_cli(recipe, ["name=one", *retrain], cwd=tmp_path)
    two = fit_cli(
        recipe,
        ["name=two", "trainer.devices=2", "trainer.strategy=ddp", *retrain],
        cwd=tmp_path,
    )
    for i, name in enumerate(("prune", "retrain")):
        a, b = _stage(one, i, name)["state_dict"], _stage(two, i, name)["state_dict"]
        assert_states_close(a, b, atol=1e-6, rtol=1e-5)
        for k in _masks(a):
            assert torch.equal(a[k], b[k])
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    for key in ("val/acc", "val/acc_train_classes", "val/acc_other_classes"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-6), key
    assert m1["val/acc_train_classes"] > m1["val/acc_other_classes"]


SOUP = """
seed: 1
name: soup
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
trainer: {max_steps: 10, enable_progress_bar: false, limit_val_batches: 1.0}
stages:
  - name: prune
    plugins: [{name: one-shot-pruning, sparsity: 0.5, step: 4}]
  - name: soup
    trainer: {max_steps: 8, checkpoint_every_n_steps: 4}
    ingredients: [{seed: 11}, {seed: 12}, {seed: 13, optimizer: {weight_decay: 0.001}}]
    soup: {method: uniform}
"""


@pytest.fixture
def soup_recipe(tmp_path):
    return write_recipe(tmp_path / "soup.yaml", SOUP + f"run_dir: {tmp_path}/runs\n")


def test_uniform_soup_averages_ingredients_of_one_mask(soup_recipe):
    built, metrics = fit(R.load(soup_recipe))
    run = built.run_dir
    stage = run / "stages" / "1-soup"
    ends = [load_checkpoint(stage / f"ingredient-{j}")["state_dict"] for j in range(3)]
    masks = [_masks(e) for e in ends]
    for k in masks[0]:  # every ingredient kept the mask it started from
        assert torch.equal(masks[0][k], masks[1][k]) and torch.equal(masks[0][k], masks[2][k])
    soup = torch.load(stage / "soup_weights.pt", weights_only=True)
    effective = [_effective(e) for e in ends]
    for layer in effective[0]:
        mean = sum(e[layer] for e in effective) / 3
        w = soup[
            f"{layer.removeprefix('model.')}.weight"
        ]  # the soup holds the model's plain weights
        torch.testing.assert_close(w, mean, atol=1e-7, rtol=0)
        mask = masks[0][f"{layer}.parametrizations.weight.0.mask"]
        assert bool((w[~mask] == 0).all())  # sparsity preserved by construction
    # the ingredients differ (seeds, weight decay), so the average is not any one of them
    assert (effective[0]["model.1"] - effective[1]["model.1"]).abs().max() > 1e-3
    record = json.loads((run / "stages.json").read_text())[1]
    assert record["soup"]["used"] == [0, 1, 2] and len(record["ingredients"]) == 3
    assert metrics == record["metrics"] and "val/acc" in metrics


def test_greedy_soup_keeps_the_best_ingredient_and_never_loses(soup_recipe):
    built, metrics = fit(R.load(soup_recipe, ["stages.1.soup.method=greedy"]))
    record = json.loads((built.run_dir / "stages.json").read_text())[1]
    accs = [ing["metrics"]["val/acc"] for ing in record["ingredients"]]
    best = max(range(3), key=lambda j: accs[j])
    assert best in record["soup"]["used"]
    assert metrics["val/acc"] >= max(accs) - 1e-9


@pytest.mark.parametrize("method", ["uniform", "greedy"])
def test_resume_inside_an_ingredient_ends_with_the_same_soup(soup_recipe, method):
    # greedy: the ingredients finished before the resume are ranked by the validation metrics
    # their earlier fit wrote (ingredient-<j>/metrics.json), read back, not recomputed
    soup = f"stages.1.soup.method={method}"
    full, full_metrics = fit(R.load(soup_recipe, ["name=full", soup]))
    ckpt = full.run_dir / "stages" / "1-soup" / "ingredient-1" / "checkpoints" / "step4.ckpt"
    resumed, metrics = fit(R.load(soup_recipe, ["name=resumed", soup]), resume=str(ckpt))
    a = torch.load(full.run_dir / "stages" / "1-soup" / "soup_weights.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "stages" / "1-soup" / "soup_weights.pt", weights_only=True)
    assert_states_close(a, b, atol=0)
    assert metrics == full_metrics
    # every fit of a stage leaves its final metrics in its directory (the resumed run holds
    # the fits it ran: ingredients 1 and 2)
    for run, fits in (
        (full, ("0-prune", "1-soup/ingredient-0", "1-soup/ingredient-2")),
        (resumed, ("1-soup/ingredient-1", "1-soup/ingredient-2")),
    ):
        for where in fits:
            assert "val/acc" in json.loads(
                (run.run_dir / "stages" / where / "metrics.json").read_text()
            )


def test_batchnorm_recalibration_hand_derived():
    """momentum=None makes the running mean the average of the chunk means: with equal chunks,
    the mean of the data; the running variance the average of the chunks' unbiased variances."""
    from types import SimpleNamespace

    from paperhooks.stages import recalibrate_bn
    from paperhooks.tasks import DictDataset

    x = torch.arange(8, dtype=torch.float32).reshape(8, 1)  # chunks of 4: [0..3], [4..7]
    bn = torch.nn.BatchNorm1d(1, momentum=0.3)
    bn.running_mean.fill_(100.0)
    module = SimpleNamespace(model=torch.nn.Sequential(bn), device=torch.device("cpu"))
    module.outputs = lambda batch: module.model(batch["input"])
    dm = SimpleNamespace(train_set=DictDataset({"input": x}), batch_size=4)
    recalibrate_bn(module, dm)
    assert bn.running_mean.item() == pytest.approx(3.5)  # (1.5 + 5.5) / 2
    assert bn.running_var.item() == pytest.approx(
        5 / 3
    )  # var([0,1,2,3], unbiased) = 5/3, both chunks
    assert bn.momentum == 0.3 and int(bn.num_batches_tracked) == 2
