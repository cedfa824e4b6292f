"""Whole runs: bit-identical resume, N processes = 1 process, and the paper's effect."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import assert_nested_close
from paperhooks_aranyani import demographic_parity

SMALL = {"n_train": 320, "n_val": 64}  # 20 batches of 16 an epoch


def _fit(raw, resume=None):
    return fit(R.validate(raw), resume=None if resume is None else str(resume))


def test_resume_from_a_mid_run_step_is_bit_identical(tmp_path, make_recipe):
    # 12 steps with a checkpoint at step 8, momentum-with-correction averages
    raw = make_recipe(
        tmp_path / "runs",
        [{"name": "aranyani", "gradient_type": "ema"}],
        name="full",
        data=SMALL,
        trainer={"max_steps": 12, "checkpoint_every_n_steps": 8},
    )
    full, _ = _fit(raw)
    end, mid = load_checkpoint(full.run_dir), load_checkpoint(full.run_dir, "step8.ckpt")
    assert mid["global_step"] == 8 and end["global_step"] == 12
    (saved,) = mid["paperhooks"]["plugins"]
    assert saved["state"]["counts"].sum().item() == 8 * 16  # the aggregates are in the checkpoint
    assert not torch.equal(
        saved["state"]["grad_w"], end["paperhooks"]["plugins"][0]["state"]["grad_w"]
    )
    resumed, _ = _fit(
        {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step8.ckpt"
    )
    again = load_checkpoint(resumed.run_dir)
    assert again["global_step"] == 12
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert_nested_equal(
        end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
    )


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_global_batch(tmp_path, make_recipe):
    raw = make_recipe(
        tmp_path / "runs", [{"name": "aranyani"}], data=SMALL, trainer={"max_steps": 8}
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(path, ["name=ddp", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
    )
    assert one["global_step"] == many["global_step"] == 8
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
    a, b = one["paperhooks"]["plugins"], many["paperhooks"]["plugins"]
    assert_nested_close(a, b, "plugin states", atol=1e-6, rtol=1e-5)
    state = a[0]["state"]
    assert state["counts"].sum().item() == 8 * 16  # global counts: every sample of both ranks
    assert state["grad_w"].abs().max() > 0 and state["node_sums"].abs().max() > 0


def _run(tmp_path, make_recipe, seed: int, lam: float) -> dict[str, float]:
    built, _ = _fit(
        make_recipe(
            tmp_path, [{"name": "aranyani", "lambda_const": lam}], name=f"s{seed}l{lam}", seed=seed
        )
    )
    p = built.module.plugins[0]
    v = built.datamodule.val_set.tensors
    with torch.no_grad():
        pred = built.module.model(v["input"]).argmax(-1)
    return {
        "online_acc": (p.correct[0] / p.counts.sum()).item(),
        "online_dp": (p.positives[1] / p.counts[1] - p.positives[0] / p.counts[0]).abs().item(),
        "acc": (pred == v["target"]).double().mean().item(),
        "dp": demographic_parity(pred, v["group"]).item(),
    }


def test_lambda_lowers_the_demographic_parity_gap_for_at_most_3_points_of_accuracy(
    tmp_path, make_recipe
):
    """The paper's claim, in direction: on a stream whose group correlates with the label,
    Aranyani's fairness gradient (λ = 0.3) lowers the demographic-parity gap of the forest's
    predictions against λ = 0 (the task gradient alone), at a small cost in accuracy.

    online-fair-stream defaults (5000 samples, batch 16: one pass = 312 steps), the forest of
    depth 3 with 3 trees, Adam lr 2e-3; the same data, init and batches with both λ. "online"
    is the paper's protocol (each prediction made before its sample is trained on, averaged
    over the stream); the held-out figures are the final model on 2000 fresh samples.
    """
    base = [_run(tmp_path, make_recipe, s, 0.0) for s in range(3)]
    fair = [_run(tmp_path, make_recipe, s, 0.3) for s in range(3)]
    # measured (torch 2.14.1, CPU), seeds 0, 1, 2:
    #   online DP 0.194 → 0.007, 0.446 → 0.325, 0.330 → 0.231; online acc −2.6, −1.8, −0.5 points
    #   held-out DP 0.280 → 0.027, 0.337 → 0.152, 0.258 → 0.076; held-out acc −0.7, −2.2, −2.3 points
    for b, f in zip(base, fair, strict=True):
        assert f["online_dp"] < 0.8 * b["online_dp"], (base, fair)
        assert f["dp"] < 0.7 * b["dp"], (base, fair)
        assert b["online_acc"] - f["online_acc"] <= 0.03, (base, fair)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(base, "acc") - mean(fair, "acc") <= 0.03, (base, fair)
    assert mean(fair, "online_dp") < 0.6 * mean(base, "online_dp"), (base, fair)
