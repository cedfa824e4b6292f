"""The conformance kit passes good plugins and fails each kind of bad one, naming what is wrong.

Plugins defined here are checked as classes or instances; those needing an entry point (for a
recipe or a run) are the ``bad-*`` test plugins of ``testplugins/paperhooks_testplugins.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from paperhooks.plugin import Paper, Plugin, hookimpl
from paperhooks.testing import conformance as C
from paperhooks.testing import families as FC
from paperhooks.testing.conformance import ConformanceError

PAPER = Paper(
    title="A test paper",
    authors=("A. Author",),
    year=2024,
    venue="Tests",
    arxiv="2401.00001",
    bibtex="@misc{author2024test, title = {A test paper}, author = {Author, A.}, year = {2024}}",
    code="none found",
)
STRATEGIES = {
    "single": "tested",
    "ddp": "tested",
    "fsdp2": "untested",
    "fsdp": "untested",
    "deepspeed": "unsupported",
}


def named(plugin: Plugin, name: str = "under-test") -> Plugin:
    plugin.name = name
    return plugin


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    factor: float = 1.0


class Good(Plugin):
    """Weights 1 + ℓ/max ℓ over the global batch; NaN losses raise naming the plugin."""

    Config = ScaleConfig
    name = "good"
    family = "sample-weighting"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"{self.name}: NaN losses")
        glob, mine = ctx.dist.all_gather_cat(losses)
        return (1.0 + self.config.factor * glob / glob.max().clamp_min(1e-12))[mine]


def variant(**attrs) -> type[Plugin]:
    """``Good`` with some class attributes changed."""
    return type("Variant", (Good,), attrs)


# -- metadata ---------------------------------------------------------------------------------------
def test_metadata_of_a_good_plugin_passes():
    C.check_metadata(Good, "good")
    C.check_metadata(Good)  # the entry-point name is optional


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"paper": dataclasses.replace(PAPER, bibtex="")}, "paper.bibtex is empty"),
        (
            {"paper": dataclasses.replace(PAPER, bibtex="@misc{x, title={unbalanced}")},
            "balanced braces",
        ),
        ({"paper": dataclasses.replace(PAPER, arxiv="arXiv:2401.1")}, "paper.arxiv"),
        ({"paper": dataclasses.replace(PAPER, code="github.com/x/y")}, "paper.code"),
        ({"paper": dataclasses.replace(PAPER, authors=())}, "paper.authors is empty"),
        ({"paper": dataclasses.replace(PAPER, year=24)}, "paper.year"),
        ({"paper": None}, "paper must be a paperhooks.Paper"),
        ({"family": "reweighting"}, "family 'reweighting' is not one of"),
        ({"strategies": {"single": "tested", "ddp": "tested"}}, "missing fsdp2, fsdp, deepspeed"),
        (
            {"strategies": {**STRATEGIES, "single": "untested"}},
            "strategies['single'] must be 'tested'",
        ),
        ({"strategies": {**STRATEGIES, "ddp": "works"}}, "values must be one of"),
        (
            {
                "Config": dataclasses.make_dataclass(
                    "Mutable", [("x", int, dataclasses.field(default=1))]
                )
            },
            "frozen",
        ),
        (
            {"Config": dataclasses.make_dataclass("NoDefault", [("x", int)], frozen=True)},
            "without a default: x",
        ),
        (
            {
                "Config": dataclasses.make_dataclass(
                    "Lists", [("x", list, dataclasses.field(default_factory=list))], frozen=True
                )
            },
            "does not survive a recipe round-trip",
        ),
        ({"name": "other-name"}, "differs from its entry-point name 'good'"),
    ],
)
def test_metadata_fails_naming_the_problem(attrs, message):
    with pytest.raises(ConformanceError, match=re.escape(message)):
        C.check_metadata(variant(**attrs), "good")


def test_metadata_reports_every_problem_at_once():
    bad = variant(
        paper=dataclasses.replace(PAPER, bibtex="", venue=""), strategies={"single": "tested"}
    )
    with pytest.raises(ConformanceError) as info:
        C.check_metadata(bad, "good")
    assert all(
        m in str(info.value)
        for m in ("paper.venue is empty", "paper.bibtex is empty", "missing ddp")
    )


def test_metadata_fails_a_plugin_without_a_hook_of_its_family():
    class Hookless(Plugin):
        family = "gradient-surgery"
        paper = PAPER
        strategies = STRATEGIES

    with pytest.raises(
        ConformanceError, match="implements no hook of its family 'gradient-surgery'"
    ):
        C.check_metadata(Hookless)


# -- installed plugins --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", C.discovered())
def test_every_installed_plugin_loads_and_declares_complete_metadata(name):
    C.check_metadata(C.check_entry_point(name), name)
    C.check_recipe_roundtrip(name)


def test_entry_point_check_names_the_installed_plugins():
    with pytest.raises(ConformanceError, match="no entry point .*installed: .*loss-reweighting"):
        C.check_entry_point("no-such-plugin")


def test_recipe_roundtrip_returns_the_resolved_config():
    config = C.check_recipe_roundtrip("loss-reweighting", {"burnin_steps": 3, "kl_reg": 1})
    assert (config.burnin_steps, config.kl_reg) == (3, 1.0)


def test_recipe_roundtrip_fails_a_config_a_recipe_cannot_hold(test_plugins):
    with pytest.raises(
        ConformanceError, match="'bad-list-config': its resolved config .* does not validate again"
    ):
        C.check_recipe_roundtrip("bad-list-config")


# -- sample weighting -----------------------------------------------------------------------------------
def test_sample_weighting_passes_good_plugins(test_plugins):
    FC.check_sample_weighting(named(Good()))
    C.check_family("loss-reweighting", {"burnin_steps": 1})
    # class weights do not read the losses: NaN need not raise, weights must ignore the losses
    C.check_family("class-weight", reads_losses=False)


class Negative(Good):
    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return losses - losses.mean()


class NaNSilent(Good):
    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return torch.softmax(torch.nan_to_num(losses), dim=0)


class WrongShape(Good):
    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return torch.ones(len(losses), 1)


class ZeroOnEqual(Good):
    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"{self.name}: NaN")
        return losses - losses.min()  # all-equal losses: every weight 0


class NamelessError(Good):
    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        if not bool(torch.isfinite(losses).all()):
            raise ValueError("bad losses")
        return torch.ones_like(losses)


class InPlace(Good):
    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"{self.name}: NaN")
        return losses.clamp_(min=0.0).add_(1.0)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (Negative, "weights are negative"),
        (NaNSilent, "NaN losses gave no error"),
        (WrongShape, r"shape \(16,\)"),
        (ZeroOnEqual, "weights are all zero"),
        (NamelessError, "does not name the plugin"),
        (InPlace, "changed the losses in place"),
    ],
)
def test_sample_weighting_fails_bad_weights(cls, message):
    with pytest.raises(ConformanceError, match=f"'under-test': .*{message}"):
        FC.check_sample_weighting(named(cls()))


def test_weights_declared_loss_free_must_not_read_the_losses():
    with pytest.raises(ConformanceError, match="change with the losses"):
        FC.check_sample_weighting(named(Good()), reads_losses=False)


# -- gradient surgery -------------------------------------------------------------------------------------
class Surgery(Plugin):
    family = "gradient-surgery"
    paper = PAPER
    strategies = STRATEGIES


class PCGrad(Surgery):
    """Project each gradient off the others it conflicts with (Yu et al., 2020), in row order."""

    @hookimpl
    def surgery_combine(self, grads, ctx):
        G = grads.rows
        out = G.clone()
        for i in range(G.shape[0]):
            for j in range(G.shape[0]):
                dot = torch.dot(out[i], G[j])
                if i != j and dot < 0:
                    out[i] = out[i] - dot / G[j].square().sum().clamp_min(1e-12) * G[j]
        return grads.with_rows(out)


class Ascent(Surgery):
    @hookimpl
    def surgery_combine(self, grads, ctx):
        return grads.combine(-torch.ones(len(grads)))


class FirstOnly(Surgery):
    """Follows the first objective's gradient: an ascent direction for the sum when they conflict."""

    @hookimpl
    def surgery_combine(self, grads, ctx):
        return grads.combine([1.0] + [-2.0] * (len(grads) - 1))


class Normalizes(Surgery):
    @hookimpl
    def surgery_combine(self, grads, ctx):
        return grads.with_rows(
            grads.rows / grads.rows.norm(dim=1, keepdim=True)
        )  # a zero gradient gives NaN


class InPlaceSurgery(Surgery):
    @hookimpl
    def surgery_combine(self, grads, ctx):
        grads.rows[1:] *= 0.5
        return None


def test_surgery_passes_pcgrad_and_the_plain_sum(test_plugins):
    FC.check_gradient_surgery(named(PCGrad()))
    C.check_family("sum-surgery")


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (Ascent, "not a descent direction"),
        (FirstOnly, "not a descent direction"),
        (Normalizes, "not finite \\(a zero gradient\\)"),
        (InPlaceSurgery, "changed its input gradients in place"),
    ],
)
def test_surgery_fails_bad_directions(cls, message):
    with pytest.raises(ConformanceError, match=message):
        FC.check_gradient_surgery(named(cls()))


def test_conflicting_gradients_do_conflict():
    G = FC.conflicting_gradients(3, 12, seed=0)
    assert torch.dot(G[0], G[1]) < 0 and torch.dot(G[0], G[2]) < 0


# -- pruning ------------------------------------------------------------------------------------------------
class Pruning(Plugin):
    family = "pruning"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def pruning_schedule(self, ctx):
        return 0.5 * ctx.progress


class KeepsEverything(Pruning):
    @hookimpl
    def pruning_allocate(self, scores, sparsity, ctx):
        return {k: torch.ones_like(s, dtype=torch.bool) for k, s in scores.items()}


class PerLayerHalf(Plugin):
    """Allocation only: half of each layer, whatever was asked."""

    family = "pruning"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def pruning_allocate(self, scores, sparsity, ctx):
        return {k: s >= s.flatten().median() for k, s in scores.items()}


class NeverPrunes(Pruning):
    @hookimpl
    def pruning_schedule(self, ctx):
        return 0.0


def test_pruning_passes_schedules_that_reach_their_sparsity(test_plugins):
    FC.check_pruning(named(Pruning()))
    C.check_family("step-pruning")


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (KeepsEverything, "masks reach sparsity 0.0000, asked 0.5000"),
        (PerLayerHalf, "asked 0.2500"),
        (NeverPrunes, "never asks for a positive sparsity"),
    ],
)
def test_pruning_fails_masks_that_miss_the_sparsity(cls, message):
    with pytest.raises(ConformanceError, match=message):
        FC.check_pruning(named(cls()))


# -- the other families ------------------------------------------------------------------------------------
class NoParametrization(Plugin):
    family = "reparameterization"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def reparam_setup(self, module, ctx):
        return None


class Unit(nn.Module):
    def forward(self, w):
        return w / w.norm()


class UnitNorm(NoParametrization):
    @hookimpl
    def reparam_setup(self, module, ctx):
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(module.model[0], "weight", Unit())


class Objective(Plugin):
    family = "objective"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        return {"entropy": -torch.special.entr(outputs["logits"].softmax(1)).sum(1)}


class ScalarObjective(Objective):
    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        return {"entropy": outputs["logits"].mean()}


class ObjWeight(Plugin):
    family = "objective-weighting"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def objweight_coefficients(self, objectives, ctx):
        return {k: 1.0 / (1e-3 + float(v)) for k, v in objectives.items()}


class UnknownObjective(ObjWeight):
    @hookimpl
    def objweight_coefficients(self, objectives, ctx):
        return {"typo": 1.0}


class Optim(Plugin):
    family = "optimizer"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def optimizer_build(self, param_groups, ctx):
        return torch.optim.Adam(param_groups)


class Ascending(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=group["lr"])


class AscentOptim(Optim):
    @hookimpl
    def optimizer_build(self, param_groups, ctx):
        return Ascending(param_groups)


class Metric(Plugin):
    family = "metric"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def metric_build(self, module, ctx):
        import torchmetrics

        class Mean(torchmetrics.MeanMetric):
            def update(self, outputs, batch):
                super().update(outputs["logits"].mean())

        return {"mean_logit": Mean()}


class DottedMetric(Metric):
    @hookimpl
    def metric_build(self, module, ctx):
        return {"val.mean": next(iter(Metric.metric_build(self, module, ctx).values()))}


class Perturb(Plugin):
    family = "input-perturbation"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def perturb_inputs(self, batch, module, ctx):
        x = batch["input"].detach().requires_grad_(True)
        loss = module.losses({**batch, "input": x}, module.outputs({**batch, "input": x})).sum()
        (g,) = torch.autograd.grad(loss, x)
        return {**batch, "input": x.detach() + 0.01 * g.sign()}


class LeakyPerturb(Perturb):
    @hookimpl
    def perturb_inputs(self, batch, module, ctx):
        x = batch["input"].detach().requires_grad_(True)
        module.losses({**batch, "input": x}, module.outputs({**batch, "input": x})).sum().backward()
        return {**batch, "input": x.detach() + 0.01 * x.grad.sign()}


class Transform(Plugin):
    family = "post-training"
    paper = PAPER
    strategies = STRATEGIES

    @hookimpl
    def transform_after_fit(self, module, datamodule, ctx):
        with torch.no_grad():
            for p in module.model.parameters():
                p.copy_(torch.round(p * 16) / 16)  # 4 fractional bits


class NaNTransform(Transform):
    @hookimpl
    def transform_after_fit(self, module, datamodule, ctx):
        with torch.no_grad():
            next(module.model.parameters()).fill_(math.nan)


@pytest.mark.parametrize("cls", [UnitNorm, Objective, ObjWeight, Optim, Metric, Perturb, Transform])
def test_family_checks_pass_good_plugins(cls):
    C.check_family(named(cls()))


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (NoParametrization, "registered no parametrization"),
        (ScalarObjective, "must have shape \\[B\\] or \\[B, T\\]"),
        (UnknownObjective, "must name objectives among"),
        (AscentOptim, "did not decrease"),
        (DottedMetric, "without '.'"),
        (LeakyPerturb, "left gradients in the parameters' .grad"),
        (NaNTransform, "output is not finite"),
    ],
)
def test_family_checks_fail_bad_plugins(cls, message):
    with pytest.raises(ConformanceError, match=message):
        C.check_family(named(cls()))


# -- runs ----------------------------------------------------------------------------------------------------
def test_few_steps_fail_when_training_goes_to_nan(tmp_path, test_plugins):
    with pytest.raises(ConformanceError, match="'bad-inf-objective': .*not finite"):
        C.check_few_steps("bad-inf-objective", {}, tmp_path)


def test_resume_fails_a_plugin_that_forgets_its_state(tmp_path, test_plugins):
    C.check_resume("loss-rank", {}, tmp_path / "good")  # saves its call count
    with pytest.raises(
        ConformanceError, match="'bad-forgetful': resuming from step 13 does not end bit-identical"
    ):
        C.check_resume("bad-forgetful", {}, tmp_path / "bad")


@pytest.mark.slow
def test_ddp_check_fails_weights_computed_from_one_rank_only(tmp_path, test_plugins):
    with pytest.raises(
        ConformanceError, match="'bad-local-softmax': 2 processes under 'ddp' differ"
    ):
        C.check_ddp_equals_single("bad-local-softmax", {}, tmp_path)


def test_ddp_check_is_skipped_for_an_unsupported_strategy(tmp_path, test_plugins):
    with pytest.raises(pytest.skip.Exception, match="declares strategy 'ddp' unsupported"):
        C.check_ddp_equals_single("no-ddp", {}, tmp_path)


def test_conformance_class_requires_a_name():
    class TestNameless(C.PluginConformance):
        pass

    with pytest.raises(ConformanceError, match="must set `name`"):
        TestNameless().test_loads_through_its_entry_point()
