"""Several plugins of one family in one recipe (recipes/compose-curriculum-reweighting.yaml)."""

from __future__ import annotations

from pathlib import Path

import torch

from paperhooks import recipe as R
from paperhooks.functional import Hooks
from paperhooks.run import fit, make_plugins
from paperhooks.tasks import build_datamodule

RECIPE = Path(__file__).parents[1] / "recipes" / "compose-curriculum-reweighting.yaml"


def test_two_weighting_plugins_multiply_and_the_product_is_normalized_once():
    recipe = R.load(str(RECIPE))
    curriculum, reweighting = make_plugins(recipe)
    assert (curriculum.name, reweighting.name) == ("rerank-curriculum", "loss-reweighting")
    dm = build_datamodule(recipe.data.name, recipe.data.config, seed=recipe.seed)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses = torch.rand(batch["target"].shape[0], generator=torch.Generator().manual_seed(0)) * 3

    hooks = Hooks([curriculum, reweighting], seed=recipe.seed)
    ctx = hooks.begin_step(step=30, epoch=1)  # past the burn-in, inside the curriculum
    ctx.max_steps, ctx.max_epochs = 23 * 20, 20
    w_curr = curriculum.weighting_sample_weights(losses=losses, batch=batch, ctx=ctx)
    w_loss = reweighting.weighting_sample_weights(losses=losses, batch=batch, ctx=ctx)
    assert w_curr is not None and w_loss is not None
    # neither weight is uniform, and they differ: the product is not either one alone
    for w in (w_curr, w_loss, w_curr * w_loss):
        assert float(w.std()) > 1e-3
    assert not torch.allclose(w_curr / w_curr.sum(), w_loss / w_loss.sum())

    combined = hooks.sample_weights(losses, batch)
    torch.testing.assert_close(combined, w_curr * w_loss, rtol=0, atol=0)
    got = hooks.reduce({"loss": losses}, combined)["loss"]
    product = w_curr * w_loss
    torch.testing.assert_close(got, (product / product.sum() * losses).sum())
    # normalizing once over the product differs from normalizing each weight first and
    # averaging (the mistake composition must not make)
    wrong = ((w_curr / w_curr.sum() + w_loss / w_loss.sum()) / 2 * losses).sum()
    assert abs(float(got - wrong)) > 1e-4


def test_the_composed_recipe_trains_and_both_plugins_log(tmp_path):
    recipe = R.load(
        str(RECIPE),
        [
            f"run_dir={tmp_path}",
            "trainer.max_epochs=2",
            "trainer.limit_val_batches=2",
            "plugins.loss-reweighting.burnin_steps=5",
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
        ],
    )
    built, metrics = fit(recipe)
    logged = (built.run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "rerank-curriculum/mean_weight",
        "loss-reweighting/weight_entropy",
        "loss-reweighting/ess",
    ):
        assert key in logged, f"{key} not logged; columns: {logged}"
    accuracy = [v for k, v in metrics.items() if k.startswith("val") and "acc" in k]
    assert accuracy and all(0.0 <= v <= 1.0 for v in accuracy), metrics
