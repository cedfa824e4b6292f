"""The plugin: config, metadata and the conformance kit, the objectives, the surgery hook, state, the task."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from paperhooks import recipe as R
from paperhooks.context import StepContext
from paperhooks.gradients import GradientSet
from paperhooks.module import HookedModule
from paperhooks.tasks import build_datamodule, build_model
from paperhooks.testing.conformance import (
    check_entry_point,
    check_family,
    check_metadata,
    check_recipe_roundtrip,
)
from paperhooks.testing.families import FAMILY_CHECKS
from paperhooks_pareto_da import ParetoDA, ParetoDAConfig
from paperhooks_pareto_da.plugin import HEADS, HELDOUT, SOURCE, TCM, TRANSFER

ROOT = Path(__file__).resolve().parents[3]
F64 = torch.float64
NAMES = (SOURCE, TRANSFER, TCM, HELDOUT, HEADS)


def setup(seed: int = 0, **config):
    """The plugin on a da-mlp for rotated-blobs, with its discriminators, and a training batch."""
    dm = build_datamodule("rotated-blobs", {"num_classes": 3}, seed=seed)
    torch.manual_seed(seed)
    module = HookedModule(build_model("da-mlp", {"hidden": [8, 8]}, dm.info))
    plugin = ParetoDA(ParetoDAConfig(**{"discriminator_hidden": 16, **config}))
    plugin.lifecycle_setup(module=module, ctx=StepContext(seed=seed))
    batch = {k: v[:10] for k, v in dm.train_set.tensors.items()}
    return module, plugin, batch


def gset(rows, losses) -> GradientSet:
    rows = torch.as_tensor(rows, dtype=F64)
    return GradientSet(rows, NAMES[: rows.shape[0]], torch.as_tensor(losses, dtype=F64))


# -- config, metadata, the kit ---------------------------------------------------------------------
def test_config_defaults_are_the_official_scripts():
    cfg = ParetoDAConfig()
    assert (cfg.weighting, cfg.eps, cfg.preference, cfg.refine) == ("pareto", 1e-3, (), "logits")
    assert (cfg.grl_max_steps, cfg.grl_hi, cfg.discriminator_hidden) == (500, 1.0, 1024)
    assert (cfg.features, cfg.head) == ("features", "head")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weighting": "mgda"}, "weighting"),
        ({"refine": "soft"}, "refine"),
        ({"eps": math.nan}, "eps"),
        ({"eps": True}, "eps"),
        ({"grl_hi": -1.0}, "grl_hi"),
        ({"grl_max_steps": 0}, "grl_max_steps"),
        ({"discriminator_hidden": 2.5}, "discriminator_hidden"),
        ({"preference": (1.0, -1.0)}, "preference"),
        ({"preference": (0.0, 0.0)}, "preference"),
        ({"preference": (math.inf,)}, "preference"),
        ({"features": "model.features"}, "features"),
        ({"head": ""}, "head"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ParetoDAConfig.{field}"):
        ParetoDAConfig(**kwargs)


def test_entry_point_metadata_and_recipe_round_trip_pass_the_conformance_kit():
    cls = check_entry_point("pareto-da")
    assert cls is ParetoDA
    check_metadata(cls, "pareto-da")
    values = {
        "weighting": "linear",
        "preference": [1.0, 1.0, 0.5],
        "refine": "bayes",
        "grl_max_steps": 50,
    }
    config = check_recipe_roundtrip("pareto-da", values)
    assert config == ParetoDAConfig(
        weighting="linear", preference=(1.0, 1.0, 0.5), refine="bayes", grl_max_steps=50
    )
    assert "6691766010f415a48ef32d8bbcc526f8410f4006" in cls.paper.checked_against
    assert (
        "epo_lp_dna.py" in cls.paper.checked_against and "TCM_loss.py" in cls.paper.checked_against
    )
    assert cls.columns_ok and cls.replaces_task_loss and cls.extra_families == ("objective",)
    assert cls.strategies["fsdp2"] == "tested" and cls.strategies["ddp"] == "tested"


def test_family_checks_surgery_holds_and_the_generic_objective_check_is_refused_clearly():
    # gradient surgery on the kit's generic sets (objective0, ...): all are training
    # objectives, no held-out gradient (a = 0): the LP maximizes descent; ⟨d, Σ g⟩ ≥ 0 holds
    FAMILY_CHECKS["gradient-surgery"](ParetoDA())
    # the kit's objective check runs an MLP without features/head on a batch without target
    # inputs: there is no domain adaptation to do there, and the plugin says so
    with pytest.raises(ValueError, match="pareto-da: the batch lacks"):
        check_family("pareto-da")


def test_the_example_recipe_and_the_method_card_snippet_validate_and_agree():
    recipe = R.load(ROOT / "recipes" / "pareto-da.yaml")
    card = (ROOT / "plugins" / "pareto-da" / "README.md").read_text()
    (snippet,) = re.findall(r"## Recipe\n\n```yaml\n(.*?)```", card, re.S)
    shown = R.validate(yaml.safe_load(snippet))
    # the card shows the recipe of the measured effect: same toy, optimizer and plugin settings
    assert shown.model == recipe.model and shown.data == recipe.data
    assert shown.optimizer == recipe.optimizer
    assert shown.trainer.max_steps == recipe.trainer.max_steps == 120
    assert shown.plugins[0].config == recipe.plugins[0].config


# -- set-up and objectives ---------------------------------------------------------------------------
def test_setup_adds_the_discriminators_without_touching_the_global_random_stream():
    dm = build_datamodule("rotated-blobs", {"num_classes": 3}, seed=0)
    module = HookedModule(build_model("da-mlp", {"hidden": [8, 8]}, dm.info))
    state = torch.get_rng_state()
    ParetoDA(ParetoDAConfig(discriminator_hidden=4)).lifecycle_setup(
        module=module, ctx=StepContext(seed=3)
    )
    assert torch.equal(torch.get_rng_state(), state)
    discs = module.pareto_da
    assert discs.domain[0].in_features == 8 and discs.classes.weights[0].shape == (3, 8, 4)
    assert [w.shape for w in discs.classes.weights] == [(3, 8, 4), (3, 4, 4), (3, 4, 1)]
    other = HookedModule(build_model("da-mlp", {"hidden": [8, 8]}, dm.info))
    ParetoDA(ParetoDAConfig(discriminator_hidden=4)).lifecycle_setup(
        module=other, ctx=StepContext(seed=3)
    )
    assert torch.equal(
        other.pareto_da.domain[0].weight, discs.domain[0].weight
    )  # seeded by the recipe's seed
    with pytest.raises(
        ValueError, match="pareto-da: the model must have a feature extractor `features`"
    ):
        ParetoDA().lifecycle_setup(module=HookedModule(torch.nn.Linear(2, 3)), ctx=StepContext())


def test_objective_terms_are_per_sample_finite_and_reach_only_their_parameters():
    module, plugin, batch = setup()
    terms = plugin.objective_terms(
        module=module, batch=batch, outputs={}, ctx=StepContext(step=100)
    )
    assert list(terms) == list(NAMES)
    for v in terms.values():
        assert v.shape == (10,) and bool(torch.isfinite(v).all()) and v.requires_grad
    features = {n for n, _ in module.named_parameters() if n.startswith("model.features.")}
    assert (
        set(
            plugin.surgery_parameters(
                module=module, names=[n for n, _ in module.named_parameters()]
            )
        )
        == features
    )
    named = list(module.named_parameters())
    for k, v in terms.items():
        grads = torch.autograd.grad(
            v.mean(), [p for _, p in named], retain_graph=True, allow_unused=True
        )
        reached = {
            n
            for (n, _), g in zip(named, grads, strict=True)
            if g is not None and bool(g.abs().sum() > 0)
        }
        if k == HEADS:  # the classifier and the discriminators, never the shared features
            assert reached and not reached & features, (k, reached)
            assert any(n.startswith("model.head.") for n in reached)
            assert any(n.startswith("pareto_da.domain.") for n in reached)
            assert any(n.startswith("pareto_da.classes.") for n in reached)
        else:  # L_S, L_D, L_T, L_v: the shared features only
            assert reached == features, (k, reached - features)


def test_the_transfer_gradient_is_reversed_and_scaled_by_lambda():
    module, plugin, batch = setup()
    feats = [p for n, p in module.named_parameters() if n.startswith("model.features.")]

    def transfer_grad(step):
        terms = plugin.objective_terms(
            module=module, batch=batch, outputs={}, ctx=StepContext(step=step)
        )
        return torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(terms[TRANSFER].mean(), feats)]
        )

    assert transfer_grad(0).abs().max() == 0  # λ(0) = 0: no adversarial signal yet
    late = transfer_grad(10**6)  # λ = 1
    # λ = 1 gives −∇_f of the discriminator's own loss: ascent for the discriminator
    terms = plugin.objective_terms(module=module, batch=batch, outputs={}, ctx=StepContext(step=0))
    x = torch.cat([batch["input"], batch["input_target"]])
    d = module.pareto_da.domain(module.model.features(x)).squeeze(-1)
    own = torch.nn.functional.binary_cross_entropy_with_logits(
        d, torch.cat([torch.ones(10), torch.zeros(10)])
    )
    direct = torch.cat([g.reshape(-1) for g in torch.autograd.grad(own, feats)])
    assert_close(late, -direct, atol=1e-6, rtol=1e-5)
    assert terms[TRANSFER].mean().item() == pytest.approx(own.item(), abs=1e-6)


def test_tcm_terms_mean_to_the_batch_tcm_of_the_refined_predictions():
    from paperhooks_pareto_da import refine, tcm

    module, plugin, batch = setup()
    terms = plugin.objective_terms(module=module, batch=batch, outputs={}, ctx=StepContext(step=5))
    f_t = module.model.features(batch["input_target"])
    d = torch.sigmoid(module.pareto_da.class_logits(f_t))
    rho = refine(module.model.head(f_t), d, "logits")
    assert terms[TCM].mean().item() == pytest.approx(-tcm(rho).item(), abs=1e-6)


def test_missing_batch_keys_raise_naming_the_plugin():
    module, plugin, batch = setup()
    del batch["input_heldout"]
    with pytest.raises(ValueError, match="pareto-da: the batch lacks \\['input_heldout'\\]"):
        plugin.objective_terms(module=module, batch=batch, outputs={}, ctx=StepContext())


# -- the surgery hook --------------------------------------------------------------------------------
def test_surgery_weights_by_hand_orthogonal_objectives_and_a_bisector_held_out_gradient():
    # g_S, g_D, g_T = e_1, e_2, e_3; g_v = (e_1 + e_2 + e_3)/√3; heads: no feature gradient.
    # L_v = −0.4 ≤ ε: dominance, 1ᵀCα = 1 on all of Δ: the tie goes to α = [⅓, ⅓, ⅓];
    # weights 3α = [1, 1, 1], 0 on the held-out objective, 1 on heads.
    s = 3**-0.5
    rows = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [s, s, s], [0, 0, 0]]
    plugin = ParetoDA()
    ctx = StepContext()
    d = plugin.surgery_combine(grads=gset(rows, [1.0, 0.7, -0.9, -0.4, 2.0]), ctx=ctx)
    assert_close(d.weights, torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0], dtype=F64), atol=1e-6, rtol=0)
    assert_close(d.vector, torch.tensor([1.0, 1.0, 1.0], dtype=F64), atol=1e-6, rtol=0)
    assert plugin.counts == {"balance": 0, "dominance": 1, "fallback": 0, "linear": 0}
    assert ctx.logged["pareto-da/dominance"] == 1.0
    assert ctx.logged["pareto-da/weight_tcm"] == pytest.approx(1.0, abs=1e-6)


def test_surgery_weights_by_hand_two_conflicting_objectives():
    # test_lp's dominance case through the hook: α = [⅓, ⅔], m = 2 → weights [⅔, 4/3]
    rows = [[1.0, 0.0], [-0.5, 1.0], [0.0, 1.0]]
    names = (SOURCE, TRANSFER, HELDOUT)
    grads = GradientSet(
        torch.tensor(rows, dtype=F64), names, torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    )
    d = ParetoDA().surgery_combine(grads=grads, ctx=StepContext())
    assert_close(d.weights, torch.tensor([2 / 3, 4 / 3, 0.0], dtype=F64), atol=1e-6, rtol=0)


def test_linear_weighting_uses_the_preference_and_no_lp():
    plugin = ParetoDA(ParetoDAConfig(weighting="linear", preference=(1.0, 2.0, 0.5)))
    rows = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    d = plugin.surgery_combine(grads=gset(rows, [1.0, 1.0, 1.0, 1.0, 1.0]), ctx=StepContext())
    assert torch.equal(d.weights, torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0], dtype=F64))
    assert plugin.counts["linear"] == 1
    with pytest.raises(ValueError, match="pareto-da: preference has 3 values but there are 2"):
        plugin.surgery_combine(grads=gset(rows[:2], [1.0, 1.0]), ctx=StepContext())


def test_fallback_weights_are_m_times_the_preference_as_in_the_official_script():
    # test_lp's infeasible case: official alpha = 3 * preference; here m = 2 → 2π
    rows = [[1.0, 0.0], [-1.0, 0.1], [0.0, -1.0]]
    grads = GradientSet(
        torch.tensor(rows, dtype=F64),
        (SOURCE, TRANSFER, HELDOUT),
        torch.tensor([1.0, 1.0, -1.0], dtype=F64),
    )
    plugin = ParetoDA(ParetoDAConfig(preference=(2.0, 1.0)))
    d = plugin.surgery_combine(grads=grads, ctx=StepContext())
    assert torch.equal(d.weights, torch.tensor([4.0, 2.0, 0.0], dtype=F64))
    assert plugin.counts["fallback"] == 1


def test_state_round_trip():
    plugin = ParetoDA()
    plugin.counts.update(dominance=7, fallback=2)
    other = ParetoDA()
    other.load_state_dict(plugin.state_dict())
    assert other.counts == plugin.counts
    assert plugin.state_dict() == {
        "steps_balance": 0,
        "steps_dominance": 7,
        "steps_fallback": 2,
        "steps_linear": 0,
    }


# -- the task ----------------------------------------------------------------------------------------
def test_rotated_blobs_rotates_the_target_and_pairs_the_rows():
    dm = build_datamodule("rotated-blobs", {"num_classes": 4, "rotation": 30.0, "std": 0.1}, seed=0)
    train, val = dm.train_set.tensors, dm.val_set.tensors
    assert set(train) == {"input", "target", "input_target", "input_heldout", "index"}
    assert (
        train["input"].shape
        == train["input_target"].shape
        == train["input_heldout"].shape
        == (512, 2)
    )
    assert (
        len({tuple(r) for r in train["input_heldout"].tolist()}) == 64
    )  # the held-out set is separate
    angle = math.radians(30.0)
    for k in range(4):  # source centre of class k at 90k degrees, target centre at 90k + 30
        src = train["input"][train["target"] == k].mean(0)
        tgt = val["input"][val["target"] == k].mean(0)
        theta = math.pi / 2 * k
        assert_close(
            src, torch.tensor([2 * math.cos(theta), 2 * math.sin(theta)]), atol=0.05, rtol=0
        )
        assert_close(
            tgt,
            torch.tensor([2 * math.cos(theta + angle), 2 * math.sin(theta + angle)]),
            atol=0.05,
            rtol=0,
        )
    model = build_model("da-mlp", None, dm.info)
    x = torch.randn(5, 2)
    assert torch.equal(model(x), model.head(model.features(x)))
