"""Tests of the rerank-curriculum functional, plugin and dataset, with values worked out by hand."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paperhooks.context import StepContext
from paperhooks.recipe import load as load_recipe
from paperhooks.tasks import DATASETS, build_datamodule
from paperhooks_rerank_curriculum import (
    SMOOTH,
    RerankCurriculum,
    RerankCurriculumConfig,
    centroid_ranker,
    curriculum_weight,
    pairwise_difficulty,
    pointwise_difficulty,
    reciprocal_rank,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "rerank-curriculum.yaml"


def plugin(**kwargs) -> RerankCurriculum:
    p = RerankCurriculum(RerankCurriculumConfig(**kwargs))
    p.name = "rerank-curriculum"
    return p


def weights(p: RerankCurriculum, batch, ctx: StepContext, n: int | None = None):
    n = n if n is not None else next(iter(batch.values())).shape[0]
    return p.weighting_sample_weights(losses=torch.ones(n), batch=batch, ctx=ctx)


# -- the functional form, by hand ------------------------------------------------------------
def test_reciprocal_rank_heuristic():
    assert_close(reciprocal_rank(torch.tensor([1, 2, 4, 10])), torch.tensor([1.0, 0.5, 0.25, 0.1]))
    with pytest.raises(ValueError, match="rerank-curriculum.*>= 1"):
        reciprocal_rank(torch.tensor([0, 3]))


def test_pointwise_difficulty_is_h_for_relevant_and_one_minus_h_for_the_rest():
    # h = 1/rank = [1, 0.25, 0.25, 0.1]; relevant = [T, T, F, F]
    # D = [1, 0.25, 1 − 0.25, 1 − 0.1] + ε = [1, 0.25, 0.75, 0.9] + 1e-8
    h = torch.tensor([1.0, 0.25, 0.25, 0.1])
    rel = torch.tensor([True, True, False, False])
    assert_close(pointwise_difficulty(h, rel), torch.tensor([1.0, 0.25, 0.75, 0.9]) + SMOOTH)
    # anti flips h first: D = [0, 0.75, 0.25, 0.1] + ε = 1 − D (+ 2ε − ε)
    assert_close(
        pointwise_difficulty(h, rel, anti=True), torch.tensor([0.0, 0.75, 0.25, 0.1]) + SMOOTH
    )


def test_pairwise_difficulty_takes_the_hardest_negative():
    # record 0: d⁺ at rank 1, d⁻ at ranks 2 and 5 → h = [1, 0.5, 0.2]
    #   (1 − 0.5 + 1)/2 = 0.75, (1 − 0.2 + 1)/2 = 0.9 → min 0.75
    # record 1: d⁺ at rank 10, d⁻ at ranks 1 and 2 → h = [0.1, 1, 0.5]
    #   (0.1 − 1 + 1)/2 = 0.05, (0.1 − 0.5 + 1)/2 = 0.3 → min 0.05
    h = reciprocal_rank(torch.tensor([[1, 2, 5], [10, 1, 2]]))
    assert_close(pairwise_difficulty(h), torch.tensor([0.75, 0.05]) + SMOOTH)
    # anti: 1 − min, then ε: [0.25, 0.95]
    assert_close(pairwise_difficulty(h, anti=True), torch.tensor([0.25, 0.95]) + SMOOTH)
    with pytest.raises(ValueError, match="rerank-curriculum.*1 \\+ n"):
        pairwise_difficulty(torch.tensor([0.3, 0.4]))


def test_curriculum_weight_moves_linearly_to_one_and_stays_there():
    d = torch.tensor([0.25, 0.75, 1.0])
    assert_close(curriculum_weight(d, 0.0), d)  # i = 0: W = D
    # i/m = 0.5: W = D/2 + 1/2 = [0.625, 0.875, 1]
    assert_close(curriculum_weight(d, 0.5), torch.tensor([0.625, 0.875, 1.0]))
    # i/m = 0.9: W = 0.1 D + 0.9 = [0.925, 0.975, 1]
    assert_close(curriculum_weight(d, 0.9), torch.tensor([0.925, 0.975, 1.0]))
    assert_close(curriculum_weight(d, 1.0), torch.ones(3))
    assert_close(curriculum_weight(d, 3.0), torch.ones(3))
    with pytest.raises(ValueError, match="progress"):
        curriculum_weight(d, -0.1)


def _official_pointwise(rank, relscore, epoch, eoc_epoch=20, anti=False):
    """The weight branch of ``PointwiseClTrainer.train_batch`` (OpenNIR ``pointwise_cl.py``),
    re-written here step by step for the ``reciprank`` curriculum; returns W per sample."""
    is_pos = relscore > 0
    weight = 1.0 / rank.float()
    if anti:
        weight = 1.0 - weight
    weight = torch.where(is_pos, weight, 1.0 - weight)
    weight = weight + 1e-8
    progress = epoch / eoc_epoch
    return weight * (1 - progress) + progress


@pytest.mark.parametrize("anti", [False, True])
@pytest.mark.parametrize("epoch", [0, 7, 19])
def test_plugin_agrees_with_the_official_pointwise_trainer(epoch, anti):
    g = torch.Generator().manual_seed(epoch)
    rank = torch.randint(1, 100, (32,), generator=g)
    relscore = torch.randint(-1, 3, (32,), generator=g).float()  # ≤ 0 non-relevant, as relscore > 0
    batch = {"rank": rank, "relevance": relscore}
    w = weights(plugin(anti=anti), batch, StepContext(epoch=epoch))
    assert_close(w, _official_pointwise(rank, relscore, epoch, anti=anti))


def test_official_batch_mean_form_equals_per_sample_weighting_for_one_sample():
    # The official loss is mean(ℓ)·mean(W). With B = 1 that is W₁ℓ₁, the per-sample form; the
    # core's Σ W ℓ / Σ W is then ℓ₁ (the normalization removes the scale for a single sample).
    rank, rel, loss = torch.tensor([4]), torch.tensor([1.0]), torch.tensor([2.0])
    w_off = _official_pointwise(rank, rel, epoch=10)  # 0.25·0.5 + 0.5 = 0.625
    assert_close(w_off, torch.tensor([0.625]), atol=1e-7, rtol=0)
    assert_close(loss.mean() * w_off.mean(), (w_off * loss).sum())


# -- the plugin ------------------------------------------------------------------------------
def test_notes_unit_example_rank_four_at_epoch_ten_of_twenty():
    # relevant at rank 4: D = 0.25 → W = 0.25·0.5 + 0.5 = 0.625
    # non-relevant at rank 4: D = 0.75 → W = 0.75·0.5 + 0.5 = 0.875
    batch = {"rank": torch.tensor([4, 4]), "relevance": torch.tensor([1.0, 0.0])}
    p = plugin()
    ctx = StepContext(epoch=10)
    assert_close(weights(p, batch, ctx), torch.tensor([0.625, 0.875]), atol=1e-7, rtol=0)
    assert ctx.logged["rerank-curriculum/progress"] == 0.5
    assert_close(ctx.logged["rerank-curriculum/mean_weight"], torch.tensor(0.75))
    # epoch 20 = m: the curriculum has ended, uniform weights
    ctx = StepContext(epoch=20)
    assert weights(p, batch, ctx) is None
    assert ctx.logged == {}


def test_units_epoch_step_and_fraction():
    batch = {"rank": torch.tensor([2]), "relevance": torch.tensor([1.0])}  # D = 0.5
    # step unit, m = 100 steps: step 25 → p = 0.25 → W = 0.5·0.75 + 0.25 = 0.625
    assert_close(
        weights(plugin(unit="step", end_of_curriculum=100), batch, StepContext(step=25)),
        torch.tensor([0.625]),
    )
    # the epoch unit ignores the step
    assert_close(
        weights(plugin(end_of_curriculum=4), batch, StepContext(step=999, epoch=1)),
        torch.tensor([0.625]),
    )
    # fraction unit, m = 0.5 of training: step 100 of 800 → progress 0.125 → p = 0.25
    ctx = StepContext(step=100, max_steps=800)
    assert_close(
        weights(plugin(unit="fraction", end_of_curriculum=0.5), batch, ctx), torch.tensor([0.625])
    )
    assert (
        weights(
            plugin(unit="fraction", end_of_curriculum=0.5),
            batch,
            StepContext(step=400, max_steps=800),
        )
        is None
    )
    with pytest.raises(ValueError, match="rerank-curriculum.*max_steps"):
        weights(plugin(unit="fraction", end_of_curriculum=0.5), batch, StepContext(step=1))


def test_normscore_kdescore_and_pairwise_read_their_batch_keys():
    ctx = StepContext(epoch=0)
    # normscore h = [0.9, 0.2], relevance [1, 0] → D = [0.9, 0.8]
    batch = {"normscore": torch.tensor([0.9, 0.2]), "relevance": torch.tensor([1.0, 0.0])}
    assert_close(weights(plugin(heuristic="normscore"), batch, ctx), torch.tensor([0.9, 0.8]))
    batch = {"kdescore": torch.tensor([0.3]), "label": torch.tensor([2])}
    assert_close(
        weights(plugin(heuristic="kdescore", relevance_key="label"), batch, ctx),
        torch.tensor([0.3]),
    )
    # pairwise needs no relevance key: column 0 is the relevant document (values from above)
    batch = {"rank": torch.tensor([[1, 2, 5], [10, 1, 2]])}
    assert_close(weights(plugin(mode="pairwise"), batch, ctx), torch.tensor([0.75, 0.05]))


def test_missing_or_invalid_batch_keys_raise_naming_the_plugin():
    ctx = StepContext(epoch=0)
    with pytest.raises(ValueError, match=r"rerank-curriculum.*lacks \['rank'\].*digits-difficulty"):
        weights(plugin(), {"input": torch.zeros(3, 2), "relevance": torch.ones(3)}, ctx, n=3)
    with pytest.raises(ValueError, match=r"rerank-curriculum.*lacks \['relevance'\]"):
        weights(plugin(), {"rank": torch.tensor([1, 2])}, ctx)
    with pytest.raises(ValueError, match="rerank-curriculum.*normscore.*\\[0, 1\\]"):
        weights(
            plugin(heuristic="normscore"),
            {"normscore": torch.tensor([1.5]), "relevance": torch.ones(1)},
            ctx,
        )
    with pytest.raises(ValueError, match="rerank-curriculum.*shape"):
        weights(plugin(), {"rank": torch.tensor([[1, 2]]), "relevance": torch.ones(1)}, ctx)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_raise_naming_the_plugin(bad):
    batch = {"rank": torch.tensor([1, 2, 3]), "relevance": torch.ones(3)}
    with pytest.raises(ValueError, match="rerank-curriculum"):
        plugin().weighting_sample_weights(
            losses=torch.tensor([1.0, bad, 0.5]), batch=batch, ctx=StepContext()
        )


@pytest.mark.parametrize(
    "losses", [torch.zeros(4), torch.full((4,), 2.3), torch.tensor([0.1, 5.0, 0.0, 9.0])]
)
def test_weights_do_not_depend_on_the_losses(losses):
    # zero-loss and equal-loss batches are ordinary: W comes from the heuristic only
    batch = {"rank": torch.tensor([1, 2, 4, 8]), "relevance": torch.ones(4)}
    w = plugin().weighting_sample_weights(losses=losses, batch=batch, ctx=StepContext(epoch=0))
    assert_close(w, torch.tensor([1.0, 0.5, 0.25, 0.125]) + SMOOTH)


def test_family_properties_on_batches_with_the_heuristic_keys():
    # The conformance kit's sample-weighting check builds batches without heuristic keys;
    # the same properties, on batches that carry them: shape [B], finite, >= 0, not all zero.
    g = torch.Generator().manual_seed(0)
    for mode in ("pointwise", "pairwise"):
        for n in (1, 16):
            shape = (n,) if mode == "pointwise" else (n, 3)
            for rank in (
                torch.ones(shape, dtype=torch.long),
                torch.randint(1, 1000, shape, generator=g),
            ):
                for relevance in (
                    torch.zeros(n),
                    torch.ones(n),
                ):  # all-negative: D = 1 − 1/rank can be 0
                    for epoch in (0, 5, 19):
                        w = weights(
                            plugin(mode=mode),
                            {"rank": rank, "relevance": relevance},
                            StepContext(epoch=epoch),
                            n,
                        )
                        assert (
                            w.shape == (n,)
                            and bool(torch.isfinite(w).all())
                            and bool((w >= 0).all())
                        )
                        assert bool(w.sum() > 0), (mode, n, epoch)


def test_plugin_has_no_state_and_complete_metadata():
    p = plugin()
    assert p.state_dict() == {}
    assert RerankCurriculum.family == "sample-weighting"
    assert RerankCurriculum.paper.missing() == []
    assert RerankCurriculum.paper.arxiv == "2004.14269"
    assert "pointwise_cl.py" in RerankCurriculum.paper.checked_against
    eps = importlib.metadata.entry_points(group="paperhooks")
    (ep,) = [ep for ep in eps if ep.name == "rerank-curriculum"]
    assert ep.load() is RerankCurriculum


# -- config ----------------------------------------------------------------------------------
def test_config_defaults_are_the_official_ones():
    cfg = RerankCurriculumConfig()
    assert (cfg.heuristic, cfg.mode, cfg.end_of_curriculum, cfg.unit, cfg.anti) == (
        "reciprank",
        "pointwise",
        20.0,
        "epoch",
        False,
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"heuristic": "bm25"}, "heuristic", "reciprank, normscore, kdescore"),
        ({"mode": "listwise"}, "mode", "pointwise, pairwise"),
        ({"unit": "batch"}, "unit", "epoch, step, fraction"),
        ({"end_of_curriculum": 0}, "end_of_curriculum", "> 0"),
        ({"end_of_curriculum": -3.0}, "end_of_curriculum", "> 0"),
        ({"end_of_curriculum": math.inf}, "end_of_curriculum", "> 0"),
        ({"end_of_curriculum": True}, "end_of_curriculum", "> 0"),
        ({"end_of_curriculum": 1.5, "unit": "fraction"}, "end_of_curriculum", r"\(0, 1\]"),
        ({"anti": 1}, "anti", "true or false"),
        ({"relevance_key": ""}, "relevance_key", "non-empty"),
    ],
)
def test_config_rejects_bad_values_naming_the_field_and_the_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError, match=f"RerankCurriculumConfig.{field}.*{allowed}"):
        RerankCurriculumConfig(**kwargs)


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["rerank-curriculum"]
    assert recipe.data.name == "digits-difficulty"


# -- the dataset -----------------------------------------------------------------------------
def test_centroid_ranker_by_hand():
    # 1-d points; class 0 at {0, 2} (centroid 1), class 1 at {10} (centroid 10)
    x = torch.tensor([[0.0], [2.0], [10.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])  # the last point is "mislabelled"
    # centroids: class 0 = mean(0, 2) = 1, class 1 = mean(10, 2) = 6
    # x=0: s = [−1, −36] → label 0 ranked 1, normscore 1
    # x=2: s = [−1, −16] → label 0 ranked 1
    # x=10: s = [−81, −16] → label 1 ranked 1
    # x=2 labelled 1: s = [−1, −16] → rank 2, normscore (−16 − −16)/(−1 − −16) = 0
    out = centroid_ranker(x, y, 2)
    assert out["rank"].tolist() == [1, 1, 1, 2]
    assert_close(out["normscore"], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert out["relevance"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_digits_difficulty_carries_the_keys_and_ranks_noisy_labels_low():
    assert "digits-difficulty" in DATASETS
    dm = build_datamodule(
        "digits-difficulty", {"label_noise": {"kind": "symmetric", "rate": 0.4}}, 0
    )
    t = dm.train_set.tensors
    assert {"rank", "normscore", "relevance", "input", "target", "index"} <= set(t)
    assert int(t["rank"].min()) >= 1 and int(t["rank"].max()) <= 10
    assert bool(((t["normscore"] >= 0) & (t["normscore"] <= 1)).all())
    noisy = t["target"] != t["clean_target"]
    h = 1.0 / t["rank"].float()
    # measured: clean 0.936, corrupted 0.236 (seed 0); the heuristic separates them widely
    assert h[~noisy].mean() > 0.85 and h[noisy].mean() < 0.35
    batch = next(iter(dm.train_dataloader()))
    assert {"rank", "normscore", "relevance"} <= set(batch)
