"""The registered task: synthetic-recsys (known exposure bias) and the mf model."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from paperhooks.tasks import DataInfo, build_datamodule, build_model
from paperhooks_kernel_balancing import MFConfig, RecsysInfo, SyntheticRecsysConfig
from paperhooks_kernel_balancing.tasks import MatrixFactorization, simulate


def test_simulated_ratings_are_standardized_and_exposure_follows_the_formula():
    cfg = SyntheticRecsysConfig(num_users=30, num_items=20)
    sim = simulate(cfg, seed=0)
    r, p = sim["rating"], sim["propensity"]
    assert r.shape == p.shape == sim["observed"].shape == (30, 20)
    assert abs(r.mean().item()) < 1e-6 and abs(r.std().item() - 1) < 1e-5
    # logit p − β R = α + κ pop_i does not depend on the user
    rest = torch.logit(p.double()) - cfg.exposure_rating * r.double()  # [U, I]
    assert_close(rest, rest[:1].expand_as(rest), atol=1e-4, rtol=0)


def test_observed_ratings_are_biased_upwards_only_when_exposure_depends_on_the_rating():
    biased = simulate(SyntheticRecsysConfig(), seed=0)
    # measured: observed mean rating ≈ 0.86 (standardized), against 0 over all pairs
    assert biased["rating"][biased["observed"]].mean() > 0.5
    fair = simulate(SyntheticRecsysConfig(exposure_rating=0.0, exposure_popularity=0.0), seed=0)
    assert_close(
        fair["propensity"],
        torch.full_like(fair["propensity"], torch.sigmoid(torch.tensor(-1.5)).item()),
    )
    assert abs(fair["rating"][fair["observed"]].mean().item()) < 0.15


def test_dataset_trains_on_the_observed_pairs_and_validates_on_all_pairs():
    cfg = SyntheticRecsysConfig(num_users=30, num_items=20)
    dm = build_datamodule("synthetic-recsys", cfg, seed=3)
    sim = simulate(cfg, seed=3)
    assert isinstance(dm.info, RecsysInfo)
    assert (dm.info.task, dm.info.input_shape, dm.info.num_users, dm.info.num_items) == (
        "regression",
        (2,),
        30,
        20,
    )
    train, val = dm.train_set.tensors, dm.val_set.tensors
    pairs = train["input"]
    assert pairs.dtype == torch.int64 and pairs.shape == (int(sim["observed"].sum()), 2)
    assert bool(sim["observed"][pairs[:, 0], pairs[:, 1]].all())
    assert_close(train["target"], sim["noisy"][pairs[:, 0], pairs[:, 1]])
    assert_close(train["propensity"], sim["propensity"][pairs[:, 0], pairs[:, 1]])
    assert val["input"].shape == (600, 2)
    assert_close(val["target"], sim["rating"][val["input"][:, 0], val["input"][:, 1]])


def test_dataset_is_a_function_of_the_seed():
    a = build_datamodule("synthetic-recsys", None, seed=1).train_set.tensors
    b = build_datamodule("synthetic-recsys", None, seed=1).train_set.tensors
    c = build_datamodule("synthetic-recsys", None, seed=2).train_set.tensors
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    assert a["input"].shape != c["input"].shape or not torch.equal(a["input"], c["input"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_users": 0}, "num_users"),
        ({"rank": 0}, "rank"),
        ({"noise": -0.1}, "noise"),
        ({"exposure_rating": float("nan")}, "exposure_rating"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_dataset_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticRecsysConfig(**kwargs)


def test_no_observed_pair_is_an_error():
    with pytest.raises(ValueError, match="no pair was observed"):
        build_datamodule(
            "synthetic-recsys", {"num_users": 2, "num_items": 2, "exposure_base": -60.0}, seed=0
        )


def test_mf_prediction_matches_hand_computation():
    model = MatrixFactorization(2, 3, MFConfig(dim=2))
    with torch.no_grad():
        model.user.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
        model.item.weight[2] = torch.tensor([3.0, 4.0])
        model.user_bias.weight[0] = 0.5
        model.item_bias.weight[2] = 0.25
        model.global_bias.fill_(0.1)
    # user 0, item 2: 1·3 + 2·4 + 0.5 + 0.25 + 0.1 = 11.85; user 1, item 2: 0 + 0 + 0.25 + 0.1 = 0.35
    assert_close(model(torch.tensor([[0, 2], [1, 2]])), torch.tensor([11.85, 0.35]))


def test_mf_variants_and_its_data_requirement():
    info = RecsysInfo("regression", 0, (2,), 4, 5)
    biases_only = build_model("mf", {"dim": 0}, info)
    assert biases_only(torch.tensor([[3, 4]])).shape == (1,)
    no_bias = build_model("mf", {"bias": False}, info)
    assert not any("bias" in n for n, _ in no_bias.named_parameters())
    with pytest.raises(ValueError, match="dim"):
        MFConfig(dim=0, bias=False)
    with pytest.raises(ValueError, match="num_users and num_items"):
        build_model("mf", None, DataInfo("regression", 0, (2,)))
