"""The febs objective and the febs-metric metrics, called as the core calls them."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from paperhooks.context import StepContext
from paperhooks.functional import Hooks
from paperhooks_febs import (
    FEBS,
    TERM,
    EquityScaledConfig,
    EquityScaledMetric,
    FEBSConfig,
    GroupPerformance,
    febs_value_and_grad,
    group_sums,
    per_sample_sums,
)


def febs(**kw) -> FEBS:
    p = FEBS(FEBSConfig(**kw))
    p.name = "febs"
    return p


def batch(n: int = 8, classes: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"target": torch.randint(classes, (n,), generator=g), "group": torch.arange(n) % 2}


# -- config and metadata ---------------------------------------------------------------------------
def test_config_defaults_are_the_official_ones():
    c = FEBSConfig()
    assert (c.gamma, c.num_groups, c.dice_weight, c.smooth, c.absent_classes) == (
        1.0,
        2,
        1.0,
        1e-5,
        "skip",
    )
    m = EquityScaledConfig()
    assert (m.num_groups, m.perf, m.alpha, m.spread, m.worst_group) == (
        2,
        "accuracy",
        1.0,
        "abs",
        True,
    )


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (FEBSConfig, {"gamma": -1.0}, "gamma"),
        (FEBSConfig, {"gamma": math.inf}, "gamma"),
        (FEBSConfig, {"dice_weight": 0.0}, "dice_weight"),
        (FEBSConfig, {"smooth": 0.0}, "smooth"),
        (FEBSConfig, {"num_groups": 0}, "num_groups"),
        (FEBSConfig, {"num_groups": True}, "num_groups"),
        (FEBSConfig, {"absent_classes": "drop"}, "absent_classes"),
        (EquityScaledConfig, {"num_groups": 0}, "num_groups"),
        (EquityScaledConfig, {"alpha": -0.5}, "alpha"),
        (EquityScaledConfig, {"spread": "var"}, "spread"),
        (EquityScaledConfig, {"perf": "auc"}, "perf"),
        (EquityScaledConfig, {"worst_group": "yes"}, "worst_group"),
    ],
)
def test_configs_reject_bad_values_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
        cls(**kwargs)


def test_both_entry_points_load_from_one_distribution():
    eps = {e.name: e for e in importlib.metadata.entry_points(group="paperhooks")}
    assert eps["febs"].load() is FEBS and eps["febs-metric"].load() is EquityScaledMetric
    assert eps["febs"].dist.name == eps["febs-metric"].dist.name == "paperhooks-febs"
    assert (FEBS.family, EquityScaledMetric.family) == ("objective", "metric")


# -- the objective ------------------------------------------------------------------------------------
def test_term_through_the_core_is_the_official_loss_with_its_gradient(official_febs_loss):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 3, generator=g, requires_grad=True)
    b = {
        "target": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
        "group": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
    }
    hooks = Hooks([febs(absent_classes="count")])
    hooks.begin_step(step=0)
    ce = F.cross_entropy(logits, b["target"], reduction="none")
    reduced = hooks.reduce(hooks.objectives(None, b, {"logits": logits}, ce), None)
    # a classifier is a one-pixel segmenter: [B, C] → [B, C, 1, 1] for the official code
    expected = official_febs_loss(
        logits[:, :, None, None], b["target"][:, None, None], b["group"].numpy(), 2, 1.0
    )
    assert_close(reduced[TERM], expected, atol=1e-6, rtol=0)
    (got,) = torch.autograd.grad(reduced[TERM], logits, retain_graph=True)
    (want,) = torch.autograd.grad(expected, logits)
    assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert_close(reduced["loss"], ce.mean())  # the task's cross-entropy is left alone
    logged = hooks.log_items()
    assert {"febs/w0", "febs/w1", "febs/group_loss0", "febs/group_loss1", "febs/dice"} <= set(
        logged
    )
    assert math.isclose(
        float(max(logged["febs/w0"], logged["febs/w1"])), math.tanh(1.0), rel_tol=1e-6
    )


def test_dice_weight_scales_the_term_and_segmentation_logits_work():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 3, 5, 5, generator=g)
    b = {"target": torch.randint(3, (4, 5, 5), generator=g), "group": torch.tensor([0, 1, 1, 0])}
    one = febs().objective_terms(batch=b, outputs={"logits": logits}, ctx=StepContext())[TERM]
    two = febs(dice_weight=2.0).objective_terms(
        batch=b, outputs={"logits": logits}, ctx=StepContext()
    )[TERM]
    assert one.shape == (4,)
    assert_close(two, 2 * one)
    S = group_sums(per_sample_sums(logits.softmax(1), b["target"]), b["group"], 2)
    assert_close(one.mean(), febs_value_and_grad(S)[0])


def test_equal_group_losses_give_tanh_one_to_both():
    # both groups hold the same two samples: equal losses → w = [tanh 1, tanh 1]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).repeat(2, 1)
    b = {"target": torch.tensor([0, 1, 0, 1]), "group": torch.tensor([0, 0, 1, 1])}
    ctx = StepContext()
    febs().objective_terms(batch=b, outputs={"logits": logits}, ctx=ctx)
    assert_close(
        torch.stack([ctx.logged["febs/w0"], ctx.logged["febs/w1"]]),
        torch.full((2,), math.tanh(1.0)),
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise_naming_the_plugin(bad):
    logits = torch.randn(8, 3)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match="febs: logits of the global batch hold NaN or inf"):
        febs().objective_terms(batch=batch(), outputs={"logits": logits}, ctx=StepContext())


def test_missing_or_out_of_range_groups_raise_naming_the_plugin():
    logits = torch.randn(8, 3)
    with pytest.raises(ValueError, match="febs: needs batch\\['group'\\]"):
        febs().objective_terms(
            batch={"target": batch()["target"]}, outputs={"logits": logits}, ctx=StepContext()
        )
    with pytest.raises(ValueError, match="febs: group ids must lie in 0…1"):
        febs().objective_terms(
            batch={**batch(), "group": torch.arange(8) % 3},
            outputs={"logits": logits},
            ctx=StepContext(),
        )
    with pytest.raises(ValueError, match="febs: needs outputs\\['logits'\\]"):
        febs().objective_terms(batch=batch(), outputs={}, ctx=StepContext())


def test_a_batch_with_one_group_only_is_plain_scaled_dice():
    # the official code would take min over [L_0, 0] = 0 and scale everything to 0; here the
    # absent group stays out of the min: the one group present gets tanh 1
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    b = {"target": torch.tensor([0, 1, 2, 0, 1, 2]), "group": torch.zeros(6, dtype=torch.long)}
    ctx = StepContext()
    febs().objective_terms(batch=b, outputs={"logits": logits}, ctx=ctx)
    assert math.isclose(float(ctx.logged["febs/w0"]), math.tanh(1.0), rel_tol=1e-6)


# -- what FEBS does to the gradient ---------------------------------------------------------------
def _hard_group_gradient_share(
    p_hard: float, gamma: float, p_easy: float = 0.95, n: int = 8
) -> float:
    """Mean |∂L_FEBS/∂logit| of a hard-group sample over that of an easy-group sample."""
    pt = torch.tensor([p_easy] * n + [p_hard] * n)  # probability of the target class 0
    logits = torch.stack([pt.log(), (1 - pt).log()], dim=1).requires_grad_(True)
    group, target = torch.tensor([0] * n + [1] * n), torch.zeros(2 * n, dtype=torch.long)
    s = per_sample_sums(logits.softmax(dim=1), target)
    _, dS, _, _ = febs_value_and_grad(group_sums(s.detach(), group, 2), gamma)
    (grad,) = torch.autograd.grad((dS[group] * s).sum(), logits)
    return float(grad[n:, 0].abs().mean() / grad[:n, 0].abs().mean())


@pytest.mark.parametrize("p_hard", [0.9, 0.8, 0.5])
def test_official_scaling_gives_the_higher_error_group_a_smaller_gradient_share(p_hard):
    # Measured on the official formula (γ = 1) against uniform scaling (γ = 0): the easy group's
    # samples predict their class with p = 0.95, the hard group's with p_hard. With uniform
    # scaling the Dice gives a hard sample 2.1× (p_hard 0.9), 4.4× (0.8) and 9.0× (0.5) the
    # gradient of an easy one; with FEBS 1.0×, 0.39× and 0.07×: w_hard = tanh(L_easy/L_hard)
    # is small (0.23, 0.054, 0.0066) because near convergence the group Dice losses differ by
    # large factors, and scaling a group's predictions by w scales its gradient by about w.
    uniform, scaled = (
        _hard_group_gradient_share(p_hard, 0.0),
        _hard_group_gradient_share(p_hard, 1.0),
    )
    assert uniform > 2.0
    assert scaled < 0.6 * uniform


# -- the metric ---------------------------------------------------------------------------------------
def _metric_batch():
    # 5 samples; predictions right, right, right, wrong, wrong; groups 0, 0, 1, 1, unknown (−1)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    return {"logits": logits}, {
        "target": torch.tensor([0, 1, 0, 1, 0]),
        "group": torch.tensor([0, 0, 1, 1, -1]),
    }


def test_group_performance_by_hand():
    outputs, b = _metric_batch()
    # group 0: 2/2 = 1.0; group 1: 1/2 = 0.5; overall 3/5 = 0.6 (the unknown group counts here)
    # ES = 0.6/(1 + |1 − 0.6| + |0.5 − 0.6|) = 0.6/1.5 = 0.4; std: 0.6/(1 + 0.353553) = 0.443278
    cases = {
        ("equity_scaled", "abs"): 0.4,
        ("equity_scaled", "std"): 0.443278,
        ("worst", "abs"): 0.5,
    }
    for (statistic, spread), expected in cases.items():
        m = GroupPerformance(2, "accuracy", statistic, 1.0, spread)
        m.update(outputs, b)
        assert math.isclose(float(m.compute()), expected, abs_tol=1e-6), (statistic, spread)


def test_updates_accumulate_like_one_batch_and_reset_clears():
    outputs, b = _metric_batch()
    whole = GroupPerformance(2)
    whole.update(outputs, b)
    parts = GroupPerformance(2)
    for k in (slice(0, 2), slice(2, 5)):
        parts.update({"logits": outputs["logits"][k]}, {key: v[k] for key, v in b.items()})
    assert float(parts.compute()) == float(whole.compute())
    parts.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(parts.compute()))  # no group seen


def test_metric_errors_name_the_plugin():
    outputs, b = _metric_batch()
    with pytest.raises(ValueError, match="febs-metric: needs batch\\['group'\\]"):
        GroupPerformance(2).update(outputs, {"target": b["target"]})
    with pytest.raises(
        ValueError, match="febs-metric: perf 'dice' needs logits of shape \\[B, C, \\*spatial\\]"
    ):
        GroupPerformance(2, "dice").update(outputs, b)


def test_metric_build_names_the_metrics_by_performance():
    build = EquityScaledMetric(EquityScaledConfig(perf="dice")).metric_build
    assert sorted(build(module=None, ctx=StepContext())) == ["es_dice", "worst_group_dice"]
    only_es = EquityScaledMetric(EquityScaledConfig(worst_group=False)).metric_build(
        module=None, ctx=StepContext()
    )
    assert list(only_es) == ["es_acc"]


def test_dice_metric_on_label_maps():
    # image 0 (group 0) predicted perfectly: Dice 1; image 1 (group 1): class 1 missed → 0,
    # class 2 perfect → 1: 0.5. Overall 0.75, ES = 0.75/(1 + 0.25 + 0.25) = 0.5
    true = torch.tensor([[[1, 2], [0, 0]], [[1, 2], [0, 0]]])
    logits = (
        F.one_hot(torch.tensor([[[1, 2], [0, 0]], [[0, 2], [0, 0]]]), 3).permute(0, 3, 1, 2).float()
    )
    m = GroupPerformance(2, "dice")
    m.update({"logits": logits}, {"target": true, "group": torch.tensor([0, 1])})
    assert math.isclose(float(m.compute()), 0.5, abs_tol=1e-12)
