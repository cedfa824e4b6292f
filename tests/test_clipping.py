"""Gradient clipping (``trainer.gradient_clip_val``): the step is the clipped gradient's.

Lightning clips under automatic optimization; under gradient surgery (manual optimization)
the core clips the surgery's direction. Under FSDP2, a module a plugin adds beside the model
has plain gradients beside the model's DTensors, and the core computes the norm of both.
"""

from __future__ import annotations

import pytest
import torch

from helpers import fit_here, write_recipe
from paperhooks import recipe as R
from paperhooks.run import build
from paperhooks.testing import assert_states_close, final_state, fit_cli

RECIPE = """
seed: 3
name: clip
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.1, momentum: 0.0}
trainer: {max_steps: 1, enable_progress_bar: false, limit_val_batches: 0}
plugins: []
"""

CASES = {
    "plain": "plugins=[]",
    "surgery": "plugins=[{name: logit-penalty}, {name: mgda-surgery}]",
}


def _one_step(path, overrides, tmp_path):
    """(initial weights, weights after one step) of the model."""
    built = build(R.load(path, [f"run_dir={tmp_path}/runs", *overrides]))
    before = {k: v.detach().clone() for k, v in built.module.model.state_dict().items()}
    built.trainer.fit(built.module, datamodule=built.datamodule)
    return before, built.module.model.state_dict()


def _flat_step(before, after):
    return torch.cat([(after[k] - before[k]).reshape(-1) for k in before]).double()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_clipped_sgd_step_has_the_clip_norm_and_the_unclipped_direction(
    tmp_path, test_plugins, case
):
    """SGD without momentum: Δθ = −lr · g · min(1, c / ‖g‖). With c below ‖g‖, the step of the
    clipped run has norm lr · c exactly and the direction of the unclipped step."""
    path = write_recipe(tmp_path / "r.yaml", RECIPE)
    lr, c = 0.1, 0.02
    free = _flat_step(*_one_step(path, ["name=free", CASES[case]], tmp_path))
    clipped = _flat_step(
        *_one_step(path, ["name=clip", CASES[case], f"trainer.gradient_clip_val={c}"], tmp_path)
    )
    grad_norm = free.norm() / lr
    assert grad_norm > 4 * c, grad_norm  # the clip is active
    assert torch.allclose(clipped.norm(), torch.tensor(lr * c, dtype=torch.float64), rtol=1e-5)
    # torch's coefficient is c / (‖g‖ + 1e-6); atol: float32 rounding of θ + Δθ (weights ≲ 1)
    expected = free * (c / grad_norm)
    assert torch.allclose(clipped, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_clipping_on_two_processes_equals_one_process(tmp_path, test_plugins):
    """DDP and FSDP2 clip by the norm of the global gradient: 3 steps (momentum 0.9) with a
    clip that binds on every step end where one process ends on the global batch. Under FSDP2
    with a plugin's own module (``critic``: plain gradients beside the model's DTensors, which
    ``clip_grad_norm_`` refuses in one call) and with surgery, too."""
    path = write_recipe(tmp_path / "r.yaml", RECIPE)
    common = ["trainer.max_steps=3", "optimizer.momentum=0.9", "trainer.gradient_clip_val=0.02"]
    runs = {
        "plain": ("plugins=[]", ("ddp", "fsdp2")),
        "critic": ("plugins=[{name: critic}]", ("fsdp2",)),
        "critic-surgery": (
            "plugins=[{name: logit-penalty}, {name: critic}, {name: mgda-surgery}]",
            ("fsdp2",),
        ),
    }
    for case, (plugins, strategies) in runs.items():
        one = final_state(fit_here(path, [f"name={case}", plugins, *common], tmp_path))
        free = final_state(fit_here(path, [f"name={case}-free", plugins, *common[:2]], tmp_path))
        assert max((one[k] - free[k]).abs().max().item() for k in one) > 1e-3, case  # it binds
        for strategy in strategies:
            many = fit_cli(
                path,
                [f"name={case}-{strategy}", plugins, *common, "trainer.devices=2",
                 f"trainer.strategy={strategy}"],
                cwd=tmp_path,
            )  # fmt: skip
            assert_states_close(one, final_state(many), atol=1e-6, rtol=1e-5)
