"""Tests of ``ranking-accuracy``: the conformance kit on the preference task, values worked out
by hand, masks, sum-reduction across ranks, and the paper's finding on the tabular fixture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from paperhooks.preference import dpo_loss
from paperhooks.recipe import load as load_recipe
from paperhooks.testing import load_checkpoint
from paperhooks.testing.conformance import (
    PREFERENCE_TASK,
    PluginConformance,
    check_ddp_equals_single,
    check_few_steps,
    check_resume,
)
from paperhooks.testing.preference import preference_batch, preference_module
from paperhooks_ranking_accuracy import (
    PairCountMetric,
    RankingAccuracy,
    RankingAccuracyConfig,
    difficulty_threshold,
    idealized_correct,
    log_odds,
    ranking_correct,
    reference_misranking,
)

RECIPE = Path(__file__).parents[3] / "recipes" / "ranking-accuracy.yaml"
KINDS = ("ranking", "idealized", "ranking_ln", "idealized_ln")


class TestConformance(PluginConformance):
    """The kit, trained on the preference task (a 1-layer GPT-2 with DPO)."""

    name = "ranking-accuracy"
    plugin_config = {"beta": 0.1}

    def test_family_properties_hold(self) -> None:
        # the kit's metric check feeds an MLP's logits; this metric reads preference outputs
        dm, batch = preference_batch(rows=8)
        module = preference_module(dm)
        metrics = RankingAccuracy(RankingAccuracyConfig()).metric_build(module=module, ctx=None)
        assert sorted(metrics) == sorted(f"ranking-accuracy/{k}" for k in KINDS)
        for metric in metrics.values():
            metric.update(module.outputs(batch), batch)
            value = metric.compute()
            assert value.ndim == 0 and 0 <= float(value) <= 1
            metric.reset()
            assert int(metric.total) == 0

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        metrics = check_few_steps(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)
        assert {f"val/ranking-accuracy/{k}" for k in KINDS} <= set(metrics)

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        check_resume(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        check_ddp_equals_single(self.name, self.plugin_config, tmp_path, task=PREFERENCE_TASK)

    @pytest.mark.slow
    def test_two_processes_fsdp2_equal_one(self, tmp_path: Path) -> None:
        check_ddp_equals_single(
            self.name, self.plugin_config, tmp_path, "fsdp2", task=PREFERENCE_TASK
        )


def test_recipe_file_validates():
    recipe = load_recipe(RECIPE)
    assert [p.name for p in recipe.plugins] == ["ranking-accuracy"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": True}, "beta"),
        ({"alpha": 0.5}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"eps": 0.0}, "eps"),
        ({"alpha_key": ""}, "alpha_key"),
        ({"length_normalized": 1}, "length_normalized"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RankingAccuracyConfig.{field}"):
        RankingAccuracyConfig(**kwargs)


# -- values worked out by hand ----------------------------------------------------------------------
def test_idealized_accuracy_by_hand():
    # Cor. 3.3: π_Ref(y_w)/π_Ref(y_l) = 0.5 and α = 0.8 (odds 4):
    #   β = 0.1: 0.5 · 4^10 = 524288 > 1 → ranked correctly at the optimum;
    #   β = 10 : 0.5 · 4^0.1 = 0.5743 < 1 → not even the optimum ranks it correctly.
    win, lose = torch.tensor([math.log(0.5)]), torch.tensor([0.0])
    assert idealized_correct(win, lose, 0.8, 0.1).tolist() == [True]
    assert idealized_correct(win, lose, 0.8, 10.0).tolist() == [False]
    # log-space margin for β = 10: ln 0.5 + 0.1 ln 4 = −0.69315 + 0.13863 = −0.55452
    assert math.exp(math.log(0.5) + 0.1 * math.log(4)) == pytest.approx(0.5743, abs=1e-4)
    # a unanimous vote (α = 1): the official code's odds α/ε = 1/0.001 = 1000, ln 1000 = 6.9078;
    # with β = 1 a reference log-ratio of −7 stays wrong (−0.092), −6.8 is flipped (+0.108)
    assert float(log_odds(1.0)) == pytest.approx(math.log(1000))
    ref_w = torch.tensor([-7.0, -6.8])
    assert idealized_correct(ref_w, torch.zeros(2), 1.0, 1.0).tolist() == [False, True]
    # strict > (Cor. 3.3) against ≥ (Def. 2.3): a tie at α = 1/2 (odds 1) is not idealized-correct,
    # while a tie in the policy's likelihoods counts as ranked correctly
    assert idealized_correct(torch.zeros(1), torch.zeros(1), 0.5, 1.0).tolist() == [False]
    assert ranking_correct(torch.zeros(1), torch.zeros(1)).tolist() == [True]


def test_difficulty_threshold_by_hand():
    # Thm. 4.1: c = ln 2, β = 0.1: σ(0.069315) = 1/(1 + e^−0.069315) = 1/1.933033 = 0.517322, −log 0.517322 = 0.659090;
    # β = 1: −log σ(ln 2) = −log(2/3) = 0.405465
    assert float(difficulty_threshold(math.log(2), 0.1)) == pytest.approx(0.659090, abs=1e-6)
    assert float(difficulty_threshold(math.log(2), 1.0)) == pytest.approx(math.log(1.5), abs=1e-9)


def test_theorem_4_1_ranked_iff_loss_below_threshold():
    # R = 1 ⟺ L_DPO ≤ −log σ(β c), on random log-probabilities (Thm. 4.1 is an identity)
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.randn(2000, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.1
    loss = dpo_loss(pw, pl, rw, rl, beta)
    c = reference_misranking(rw, rl)
    assert torch.equal(ranking_correct(pw, pl), loss <= difficulty_threshold(c, beta))


def _outputs(cw, cl, rw, rl, mw, ml):
    t = torch.tensor
    return {
        "chosen_logps": t(cw), "rejected_logps": t(cl), "ref_chosen_logps": t(rw), "ref_rejected_logps": t(rl),
        "chosen_mask": t(mw), "rejected_mask": t(ml),
    }  # fmt: skip


def test_metrics_by_hand_with_length_normalization_and_padding():
    # pair 0: chosen −3 over 3 response tokens (−1 per token), rejected −2 over 1 token (−2 per
    #   token) behind 2 padding positions: R = 0 (−3 < −2) but R̃ = 1 (−1 ≥ −2).
    # pair 1: chosen −1 (1 token), rejected −4 (2 tokens): R = 1, R̃ = 1 (−1 ≥ −2).
    # reference: pair 0 log-ratio −3 − (−2) = −1 (R̃ ref: −1 − (−2) = +1); pair 1: −20 − (−1) = −19
    #   (R̃: −20 − (−0.5) = −19.5). β = 0.1, α = 0.8: (1/β)·ln 4 = 13.863:
    #   R*: −1 + 13.86 > 0 ✓, −19 + 13.86 < 0 ✗ → 1/2;  R̃*: both as R* → 1/2.
    out = _outputs(
        [-3.0, -1.0], [-2.0, -4.0], [-3.0, -20.0], [-2.0, -1.0],
        [[0.0, 1, 1, 1], [0, 1, 0, 0]], [[0.0, 1, 0, 0], [0, 1, 1, 0]],
    )  # fmt: skip
    expect = {"ranking": 0.5, "idealized": 0.5, "ranking_ln": 1.0, "idealized_ln": 0.5}
    for kind, value in expect.items():
        m = PairCountMetric(kind, beta=0.1, alpha=0.8)
        m.update(out, {})
        assert float(m.compute()) == value, kind
    # per-pair α from the batch (alpha_key): α = 0.999999 for pair 1 → (1/0.1)·ln(999999) = 138.2 > 19
    m = PairCountMetric("idealized", beta=0.1, alpha=0.8, alpha_key="alpha")
    m.update(out, {"alpha": torch.tensor([0.8, 0.999999])})
    assert float(m.compute()) == 1.0


def test_padding_never_counts_on_a_real_batch():
    # synthetic pairs have responses of different lengths: changing the policy's log-probs at
    # padding and prompt positions changes nothing, and R̃ divides by the response lengths.
    dm, batch = preference_batch(rows=16)
    module = preference_module(dm)
    with torch.no_grad():
        out = module.outputs(batch)
    lengths = batch["chosen_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1
    m = PairCountMetric("ranking_ln", beta=0.1)
    m.update(out, batch)
    want = (
        (out["chosen_logps"] / lengths >= out["rejected_logps"] / batch["rejected_mask"].sum(1))
        .double()
        .mean()
    )
    assert float(m.compute()) == float(want)
    noisy = dict(out)
    for side in ("chosen", "rejected"):  # garbage off the response: the sums never saw it
        noisy[f"{side}_token_logps"] = out[f"{side}_token_logps"] + 100 * (
            1 - batch[f"{side}_mask"]
        )
    again = PairCountMetric("ranking_ln", beta=0.1)
    again.update(noisy, batch)
    assert float(again.compute()) == float(want)


def test_counts_sum_across_ranks():
    # the states are counts with dist_reduce_fx="sum": two ranks' halves merged equal the whole
    g = torch.Generator().manual_seed(1)
    cols = [torch.randn(10, generator=g) for _ in range(4)]
    mask = torch.ones(10, 3)
    whole = PairCountMetric("ranking", beta=0.1)
    whole.update(_outputs(*(c.tolist() for c in cols), mask.tolist(), mask.tolist()), {})
    ranks = [PairCountMetric("ranking", beta=0.1) for _ in range(2)]
    for r, part in enumerate((slice(0, 7), slice(7, 10))):  # unequal shards
        ranks[r].update(
            _outputs(*(c[part].tolist() for c in cols), mask[part].tolist(), mask[part].tolist()),
            {},
        )
    assert all(ranks[0]._reductions[s] is not None for s in ("correct", "total"))
    ranks[0].merge_state(ranks[1])
    assert int(ranks[0].total) == 10 and float(ranks[0].compute()) == float(whole.compute())


def test_beta_defaults_to_the_objective():
    dm, _ = preference_batch(rows=2)
    module = preference_module(dm)
    (metric, *_) = (
        RankingAccuracy(RankingAccuracyConfig()).metric_build(module=module, ctx=None).values()
    )
    assert metric.beta == module.objective.beta
    with pytest.raises(ValueError, match="no beta"):
        RankingAccuracy(RankingAccuracyConfig()).metric_build(
            module=torch.nn.Linear(1, 1), ctx=None
        )


# -- the paper's finding on the tabular fixture ---------------------------------------------------------
def tabular_recipe(seed: int, run_dir: Path) -> dict:
    return {
        "seed": seed, "name": f"tabular-{seed}", "run_dir": str(run_dir),
        "model": {"name": "tabular-policy", "init": "random", "scale": 3.0},
        "data": {"name": "tabular-preferences", "prompts": 8, "responses": 20, "batch_size": 760},
        "optimizer": {"name": "adam", "lr": 0.05},
        "objective": {"beta": 0.1, "reference": "model"},
        "trainer": {"max_epochs": 30, "check_val_every_n_epoch": 30, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "log_every_n_steps": 2},
        "plugins": [{"name": "ranking-accuracy"}],
    }  # fmt: skip


def test_dpo_does_not_reach_the_idealized_ranking_accuracy(tmp_path: Path):
    """Chen et al.'s finding: DPO lowers its loss and gets the implicit reward's sign right on
    nearly every pair, yet the policy's ranking accuracy stays far below the idealized one; the
    pairs left mis-ranked are those the reference mis-ranked most (Thm. 4.1)."""
    from paperhooks.testing.runs import _fit

    for seed in range(3):
        built, m = _fit(tabular_recipe(seed, tmp_path / "runs"))
        R, R_star = m["val/ranking-accuracy/ranking"], m["val/ranking-accuracy/idealized"]
        assert R_star == 1.0  # the exact optimum ranks every pair (α = 1, odds 1/ε, β = 0.1)
        assert R < 0.8 and R_star - R > 0.2, (seed, R, R_star)
        assert m["val/reward_acc"] > 0.95 and m["val/loss"] < 0.6  # from log 2 = 0.693
        sd = load_checkpoint(built.run_dir)["state_dict"]
        pi, ref = sd["model.theta"].log_softmax(-1), sd["reference_model.theta"].log_softmax(-1)
        val = built.datamodule.val_set.tensors
        p, w, lose = val["prompt"], val["chosen_ids"][:, 1], val["rejected_ids"][:, 1]
        R0 = float(ranking_correct(ref[p, w], ref[p, lose]).double().mean())
        assert R > R0 + 0.1  # DPO does improve ranking, from about chance
        right = ranking_correct(pi[p, w], pi[p, lose])
        c = reference_misranking(ref[p, w], ref[p, lose])
        assert float(c[~right].mean()) > float(c[right].mean()) + 2, seed


@pytest.mark.slow
def test_two_processes_report_the_metrics_of_one(tmp_path: Path):
    """2 DDP processes (each validating half the pairs) log the same counts-based values as 1."""
    import json

    from omegaconf import OmegaConf

    from paperhooks.testing import fit_cli

    raw = tabular_recipe(0, tmp_path / "runs")
    raw["trainer"].update(max_epochs=3, check_val_every_n_epoch=1)
    path = tmp_path / "tabular.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = json.loads((fit_cli(path, ["name=one"], cwd=tmp_path) / "metrics.json").read_text())
    two = json.loads(
        (
            fit_cli(path, ["name=two", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
            / "metrics.json"
        ).read_text()
    )
    for kind in KINDS:
        key = f"val/ranking-accuracy/{kind}"
        assert one[key] == pytest.approx(two[key], abs=1e-12), key
