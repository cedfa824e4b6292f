"""HookedModule and the functional API: the step order, composition rules, hand-checked values."""

from __future__ import annotations

import logging

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paperhooks import HookedModule, Hooks, hookimpl
from paperhooks.errors import IncompatiblePluginsError, PluginLoadError
from paperhooks.manager import PluginSet, spec_names
from paperhooks.plugin import Plugin
from paperhooks.recipe import OptimizerSection
from paperhooks_testplugins import ClassWeight, ScaleConfig, StepPruning, SumSurgery


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def named(plugin: Plugin, name: str) -> Plugin:
    plugin.name = name
    return plugin


# -- composition rules, by hand ----------------------------------------------------------------


def test_weights_are_normalized_over_the_batch_by_hand():
    hooks = Hooks([named(ClassWeight(ScaleConfig(cls=0, factor=2.0)), "cw")])
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    batch = {"target": torch.tensor([0, 1, 0, 1])}
    # w = [2, 1, 2, 1]; Σ w ℓ = 2 + 2 + 6 + 4 = 14; Σ w = 6 → 14/6
    assert hooks.weighted_mean(losses, batch).item() == pytest.approx(14 / 6)


def test_weights_of_several_plugins_multiply_then_normalize():
    a = named(ClassWeight(ScaleConfig(cls=0, factor=2.0)), "a")
    b = named(ClassWeight(ScaleConfig(cls=1, factor=3.0)), "b")
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    batch = {"target": torch.tensor([0, 1, 0, 2])}
    w = Hooks([a, b]).sample_weights(losses, batch)
    wa, wb = Hooks([a]).sample_weights(losses, batch), Hooks([b]).sample_weights(losses, batch)
    torch.testing.assert_close(w, wa * wb)
    torch.testing.assert_close(w, torch.tensor([2.0, 3.0, 2.0, 1.0]))
    # (2·1 + 3·2 + 2·3 + 1·4) / 8 = 18/8
    assert Hooks([a, b]).weighted_mean(losses, batch).item() == pytest.approx(18 / 8)


def test_per_token_losses_are_averaged_over_the_mask():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # per sample: (1+2)/2 = 1.5 and 4/1 = 4 → mean 2.75
    assert Hooks().weighted_mean(losses, {"token_mask": mask}).item() == pytest.approx(2.75)


class Negative(Plugin):
    family = "sample-weighting"

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return -torch.ones_like(losses)


def test_invalid_weights_raise_naming_the_plugin():
    with pytest.raises(ValueError, match="plugin 'neg' returned invalid sample weights"):
        Hooks([named(Negative(), "neg")]).weighted_mean(torch.ones(3), {})


class Ones(Plugin):
    family = "sample-weighting"

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return torch.ones_like(losses)


def test_invalid_weights_on_another_rank_raise_on_this_one(monkeypatch):
    # The validity counts travel with the weights' global sum: [Σw, bad_1, bad_2] is all-reduced
    # once. Here another rank adds 3 to the sum and 2 invalid weights of plugin 'b'.
    from paperhooks import dist

    sent = []

    def other_rank_adds(t):
        sent.append(t.clone())
        return t + torch.tensor([3.0, 0.0, 2.0], dtype=t.dtype)

    monkeypatch.setattr(dist, "all_reduce_sum", other_rank_adds)
    hooks = Hooks([named(Ones(), "a"), named(Ones(), "b")])
    with pytest.raises(ValueError, match="plugin 'b' returned invalid sample weights"):
        hooks.weighted_mean(torch.ones(4), {})
    assert [t.tolist() for t in sent] == [[4.0, 0.0, 0.0]]  # one all-reduce: local sum and counts


def test_weights_summing_to_zero_over_the_global_batch_raise():
    class Zero(Ones):
        @hookimpl
        def weighting_sample_weights(self, losses, batch, ctx):
            return torch.zeros_like(losses)

    with pytest.raises(ValueError, match="sample weights sum to 0.0 over the global batch"):
        Hooks([named(Zero(), "z")]).weighted_mean(torch.ones(3), {})


# -- registration errors ---------------------------------------------------------------------------


def test_the_set_of_hook_specs_is_pinned():
    assert spec_names() == sorted(
        [
            "weighting_sample_weights",
            "objective_terms",
            "objweight_coefficients",
            "surgery_combine",
            "surgery_parameters",
            "reparam_setup",
            "reparam_after_step",
            "reparam_merge",
            "pruning_schedule",
            "pruning_scores",
            "pruning_allocate",
            "optimizer_build",
            "metric_build",
            "perturb_inputs",
            "transform_after_fit",
            "lifecycle_setup",
            "lifecycle_before_optimizer_step",
            "lifecycle_step_end",
            "lifecycle_epoch_end",
            "lifecycle_fit_end",
        ]
    )


class Misspelled(Plugin):
    family = "sample-weighting"

    @hookimpl
    def weighting_sample_weight(self, losses, batch, ctx):  # missing "s"
        return None


class WrongFamily(Plugin):
    family = "sample-weighting"

    @hookimpl
    def surgery_combine(self, grads, ctx):
        return None


class Coefs(Plugin):
    family = "objective-weighting"

    @hookimpl
    def objweight_coefficients(self, objectives, ctx):
        return {"aux": 0.5}


def test_misspelled_hook_is_an_error_not_silence():
    with pytest.raises(PluginLoadError, match="weighting_sample_weight"):
        PluginSet([named(Misspelled(), "typo")])


def test_hook_outside_the_family_is_refused():
    with pytest.raises(
        PluginLoadError, match="'wrong' of family sample-weighting implements surgery_combine"
    ):
        PluginSet([named(WrongFamily(), "wrong")])


def test_one_owner_hooks_refuse_a_second_owner():
    with pytest.raises(
        IncompatiblePluginsError, match="'c1' and 'c2' both implement objweight_coefficients"
    ):
        PluginSet([named(Coefs(), "c1"), named(Coefs(), "c2")])


# -- the step order -----------------------------------------------------------------------------------

CALLS: list[str] = []


class RecPerturb(Plugin):
    family = "input-perturbation"

    @hookimpl
    def perturb_inputs(self, batch, module, ctx):
        CALLS.append(f"perturb:{self.name}")
        return None


class RecObjective(Plugin):
    family = "objective"

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        CALLS.append("objective")
        return {"aux": outputs["logits"].pow(2).mean(dim=1)}

    @hookimpl
    def lifecycle_fit_end(self, module, ctx):
        CALLS.append(f"fit_end:{self.name}")


class RecWeights(Plugin):
    family = "sample-weighting"

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        CALLS.append("weights")
        return None

    @hookimpl
    def lifecycle_setup(self, module, ctx):
        CALLS.append("setup")

    @hookimpl
    def lifecycle_before_optimizer_step(self, module, ctx):
        CALLS.append("before_optimizer_step")

    @hookimpl
    def lifecycle_step_end(self, module, ctx):
        CALLS.append(f"step_end:{ctx.step}")

    @hookimpl
    def lifecycle_fit_end(self, module, ctx):
        CALLS.append(f"fit_end:{self.name}")


class RecCoefs(Plugin):
    family = "objective-weighting"

    @hookimpl
    def objweight_coefficients(self, objectives, ctx):
        CALLS.append("coefs:" + ",".join(sorted(objectives)))
        return {"aux": 0.5}


class RecReparam(Plugin):
    family = "reparameterization"

    @hookimpl
    def reparam_setup(self, module, ctx):
        CALLS.append("reparam_setup")

    @hookimpl
    def reparam_after_step(self, module, ctx):
        CALLS.append("reparam_after_step")


class RecTransform(Plugin):
    family = "post-training"

    @hookimpl
    def transform_after_fit(self, module, datamodule, ctx):
        CALLS.append("transform")


def tiny_data(n: int = 16, d: int = 4, classes: int = 3, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)

    def collate(rows):
        xs, ys = zip(*rows, strict=True)
        return {"input": torch.stack(xs), "target": torch.stack(ys)}

    return DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=collate)


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def test_families_fire_in_the_documented_order():
    CALLS.clear()
    plugins = [
        named(RecTransform(), "transform"),
        named(RecPerturb(), "p1"),
        named(RecWeights(), "w"),
        named(RecPerturb(), "p2"),
        named(RecObjective(), "obj"),
        named(RecCoefs(), "coefs"),
        named(RecReparam(), "reparam"),
        named(StepPruning(), "prune"),
    ]
    module = HookedModule(nn.Linear(4, 3), plugins)
    trainer(2).fit(module, tiny_data())
    step = [
        "perturb:p1",
        "perturb:p2",
        "objective",
        "weights",
        "coefs:aux,loss",
        "before_optimizer_step",
        "reparam_after_step",
    ]
    assert CALLS == [
        "reparam_setup",
        "setup",
        *step,
        "step_end:1",
        *step,
        "step_end:2",
        "fit_end:obj",
        "fit_end:w",  # reverse recipe order
        "transform",
    ]
    assert module.masks, "the pruning family registered masks at set-up"


# -- gradient surgery ------------------------------------------------------------------------------------


class TwoLosses(HookedModule):
    def losses(self, batch, outputs):
        ce = F.cross_entropy(outputs["logits"], batch["target"], reduction="none")
        return {"ce": ce, "l2": 0.1 * outputs["logits"].pow(2).sum(dim=1)}


def fit_params(plugins, steps=4) -> list[torch.Tensor]:
    torch.manual_seed(0)
    module = TwoLosses(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
        plugins,
        optimizer=OptimizerSection(name="sgd", lr=0.5),
    )
    trainer(steps).fit(module, tiny_data())
    return [p.detach().clone() for p in module.parameters()], module


def test_surgery_that_keeps_the_set_equals_summed_loss_training():
    plain, m0 = fit_params([])
    surgery, m1 = fit_params([named(SumSurgery(), "sum")])
    assert m0.automatic_optimization and not m1.automatic_optimization
    for a, b in zip(plain, surgery, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class ProjectFirst(Plugin):
    """Keep only the gradient of the first objective (an easy-to-check surgery)."""

    family = "gradient-surgery"

    @hookimpl
    def surgery_combine(self, grads, ctx):
        assert list(grads.names) == ["ce", "l2"] and len(grads) == 2
        return grads.combine([1.0, 0.0])


def test_surgery_direction_replaces_the_gradient():
    class CeOnly(HookedModule):
        def losses(self, batch, outputs):
            return {"ce": F.cross_entropy(outputs["logits"], batch["target"], reduction="none")}

    torch.manual_seed(0)
    ref = CeOnly(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
        optimizer=OptimizerSection(lr=0.5),
    )
    trainer(3).fit(ref, tiny_data())
    got, _ = fit_params([named(ProjectFirst(), "first")], steps=3)
    for a, b in zip(ref.parameters(), got, strict=True):
        torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=1e-5)


# -- before the optimizer step -------------------------------------------------------------------------------


class FreezeFirstLayer(Plugin):
    """Records the gradient norms it sees before the step, then zeroes the first layer's."""

    family = "sample-weighting"

    def __init__(self, config=None):
        super().__init__(config)
        self.norms: list[float] = []

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return None

    @hookimpl
    def lifecycle_before_optimizer_step(self, module, ctx):
        grads = [p.grad for p in module.model.parameters()]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
        module.model[0].weight.grad.zero_()


@pytest.mark.parametrize("surgery", [False, True])
def test_before_the_optimizer_step_gradients_are_final_unclipped_and_may_be_changed(surgery):
    """The hook sees the step's whole gradient before clipping (norms above the clip value),
    and what it writes into ``p.grad`` is what the optimizer steps with: the zeroed first-layer
    weight does not move (plain SGD), the other parameters do. Under gradient surgery (manual
    optimization) the hook runs after the combination, before the manual clip."""
    torch.manual_seed(0)
    plugin = FreezeFirstLayer()
    plugins = [named(plugin, "freeze")] + ([named(SumSurgery(), "sum")] if surgery else [])
    module = TwoLosses(
        nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
        plugins,
        optimizer=OptimizerSection(name="sgd", lr=0.5),
    )
    before = [p.detach().clone() for p in module.model.parameters()]
    t = trainer(3)
    if surgery:  # the recipe's clip value goes here under manual optimization
        module.manual_clip = 1e-3
    else:
        t.gradient_clip_val = 1e-3
    t.fit(module, tiny_data())
    assert module.automatic_optimization is not surgery
    assert len(plugin.norms) == 3 and min(plugin.norms) > 1e-2  # seen before the 1e-3 clip
    after = list(module.model.parameters())
    assert torch.equal(after[0].detach(), before[0])
    for a, b in zip(after[1:], before[1:], strict=True):
        moved = float((a.detach() - b).abs().max())
        assert 0 < moved <= 3 * 0.5 * 1e-3 + 1e-7  # clipped steps: at most lr · clip each


def test_pruning_reaches_the_scheduled_sparsity_and_pruned_weights_stay_zero():
    torch.manual_seed(0)
    module = HookedModule(
        nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)),
        [named(StepPruning(StepPruning.Config(final=0.5, every=2)), "prune")],
    )
    trainer(8).fit(module, tiny_data(n=64))
    # schedule: 0.5 · step/8 at even steps; the last update at step 8 asks for 0.5
    assert module.sparsity == pytest.approx(0.5, abs=1 / 112)
    for name, mask in module.masks.items():
        weight = dict(module.model.named_modules())[name].weight
        assert torch.all(weight[~mask.mask] == 0)


# -- the functional API in a user's own LightningModule -------------------------------------------------------


class UserModule(L.LightningModule):
    """Written as a typical user would, calling paperhooks from their own training_step."""

    def __init__(self, hooks: Hooks | None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.hooks = hooks
        self.seen_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        losses = F.cross_entropy(self.net(batch["input"]), batch["target"], reduction="none")
        if self.hooks is None:  # the same weighting, written out by hand
            w = torch.where(batch["target"] == 1, 3.0, 1.0)
            return (w * losses).sum() / w.sum()
        self.hooks.begin_step(self.global_step, self.current_epoch, batch_idx)
        return self.hooks.weighted_mean(losses, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def test_functional_api_in_a_plain_lightning_module_matches_hand_written_loss():
    by_hand, with_hooks = (
        UserModule(None),
        UserModule(Hooks([named(ClassWeight(ScaleConfig(cls=1, factor=3.0)), "cw")])),
    )
    trainer(4).fit(by_hand, tiny_data())
    trainer(4).fit(with_hooks, tiny_data())
    for a, b in zip(by_hand.parameters(), with_hooks.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(UserModule(None).net.weight, by_hand.net.weight)  # it trained


# -- logging steps ---------------------------------------------------------------------------------


class LoggingProbe(Plugin):
    family = "objective"

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, bool]] = []

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        self.seen.append((ctx.step, ctx.logging_step))
        ctx.log("probe/step", float(ctx.step))


def test_ctx_logging_step_is_true_exactly_on_the_steps_the_trainer_writes(tmp_path):
    import csv

    probe = named(LoggingProbe(), "probe")
    module = HookedModule(nn.Linear(4, 3), [probe])
    logger = L.loggers.CSVLogger(tmp_path, name="", version="")
    L.Trainer(
        max_steps=7,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, tiny_data())
    with open(tmp_path / "metrics.csv") as f:
        written = [int(r["step"]) for r in csv.DictReader(f) if r.get("probe/step")]
    # Lightning writes step k's logs when (k + 1) % log_every_n_steps == 0: steps 2 and 5 of 0..6
    assert written == [2, 5]
    # those, and the last step (its values end in callback_metrics, the run's summary)
    assert [k for k, flag in probe.seen if flag] == [2, 5, 6]
    assert [k for k, _ in probe.seen] == list(range(7))
    assert float(module.trainer.callback_metrics["probe/step"]) == 6.0


def test_the_last_step_of_an_epoch_bounded_fit_is_a_logging_step():
    probe = named(LoggingProbe(), "probe")
    module = HookedModule(nn.Linear(4, 3), [probe])
    L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, tiny_data())  # 2 batches per epoch: steps 0..3, none a multiple of 50
    assert [k for k, flag in probe.seen if flag] == [3]
    assert float(module.trainer.callback_metrics["probe/step"]) == 3.0


class OneOffProbe(Plugin):
    family = "objective"

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        if ctx.step == 1:  # not a logging step: the value waits for the next one
            ctx.log("probe/one_off", 42.0)


def test_a_value_logged_between_logging_steps_is_written_with_the_next_one(tmp_path):
    import csv

    module = HookedModule(nn.Linear(4, 3), [named(OneOffProbe(), "probe")])
    L.Trainer(
        max_steps=7,
        accelerator="cpu",
        logger=L.loggers.CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, tiny_data())
    with open(tmp_path / "metrics.csv") as f:
        rows = [(int(r["step"]), r.get("probe/one_off")) for r in csv.DictReader(f)]
    assert [(k, v) for k, v in rows if v] == [(2, "42.0")]


class AddsDiscriminator(Plugin):
    """A plugin that trains a module of its own beside the model (as pareto-da does)."""

    family = "objective"

    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        self.trainable = trainable

    @hookimpl
    def lifecycle_setup(self, module):
        module.add_module("critic", nn.Linear(3, 1).requires_grad_(self.trainable))


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp2"])
def test_a_trainable_module_added_beside_the_model_is_kept_whole_and_listed(strategy):
    """A plugin's own trainable module (added in lifecycle_setup) is listed as replicated: FSDP2
    shards only the model, and the core averages these gradients itself. Under FSDP2 the
    optimizer gets them in a group of their own (same settings); elsewhere one group, as before.
    A frozen added module is not listed. (2 processes against 1: tests/test_distributed.py.)"""
    module = HookedModule(
        nn.Linear(4, 3), [named(AddsDiscriminator(), "critic-plugin")], strategy=strategy
    )
    module._shard = lambda: None  # sharding needs a process group; what is checked comes before
    module.configure_model()
    assert module._replicated == list(module.critic.parameters())
    groups = module.configure_optimizers().param_groups
    if strategy == "fsdp2":
        assert [len(g["params"]) for g in groups] == [2, 2]
        assert groups[1]["params"] == list(module.critic.parameters())
        assert groups[0]["lr"] == groups[1]["lr"]
    else:
        assert [len(g["params"]) for g in groups] == [4]
    frozen = HookedModule(
        nn.Linear(4, 3),
        [named(AddsDiscriminator(trainable=False), "critic-plugin")],
        strategy=strategy,
    )
    frozen._shard = lambda: None
    frozen.configure_model()
    assert frozen._replicated == []
