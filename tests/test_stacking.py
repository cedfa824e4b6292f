"""Two reparameterizations and a pruning mask on the same weights, under DDP (issue 5).

weight-compander parametrizes every weight as Ψ(v) = a·arctan(v/b), bone adds its trainable
block on top (W' = Ψ(v) + tile(b)), and the built-in gradual-pruning mask comes last:
W_eff = M ⊙ (Ψ(v) + tile(b)). Two processes end where one process ends, pruned entries of the
effective weights are exactly zero, and the merged (exported) model computes what the
parametrized one computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import fit_here
from paperhooks.share import _build_module, _validated, effective_state_dict, read_run_recipe
from paperhooks.testing import assert_states_close, final_state, fit_cli, load_checkpoint

RECIPE = Path(__file__).parents[1] / "recipes" / "compose-reparam-pruning.yaml"
#: a short run of the recipe: 6 steps, the mask updated at steps 0, 2, 4 towards 50%
SHORT = [
    "seed=2",
    "trainer.max_steps=6",
    "trainer.limit_val_batches=0",
    "model.hidden=[32,32]",
    "plugins.bone.r=8",
    "plugins.gradual-pruning.end_step=4",
    "plugins.gradual-pruning.frequency=2",
]


@pytest.mark.slow
def test_two_reparameterizations_and_a_mask_stack_and_train_under_ddp(tmp_path):
    one_dir = fit_here(RECIPE, [*SHORT, "name=one"], tmp_path)
    ddp_dir = fit_cli(
        RECIPE,
        [
            *SHORT,
            "name=ddp",
            f"run_dir={tmp_path}/runs",
            "trainer.devices=2",
            "trainer.strategy=ddp",
        ],
        cwd=tmp_path,
    )
    one, ddp = final_state(one_dir), final_state(ddp_dir)
    assert_states_close(one, ddp, atol=1e-6, rtol=1e-5)

    # both reparameterizations and the mask sit on the hidden weights, in recipe order
    keys = [k for k in one if k.startswith("model.1.parametrizations.weight.")]
    assert [k.rsplit(".", 2)[-2:] for k in keys] == [
        ["weight", "original"],
        ["1", "block"],
        ["2", "mask"],
    ]
    assert load_checkpoint(one_dir)["paperhooks"]["sparsity"] == pytest.approx(0.5, abs=0.01)

    merged = effective_state_dict(one_dir)
    module = _build_module(_validated(read_run_recipe(one_dir)))
    module.load_state_dict(load_checkpoint(one_dir)["state_dict"])
    mask = module.model[1].parametrizations.weight[-1].mask
    assert int((~mask).sum()) > 0
    assert bool((merged["1.weight"][~mask] == 0).all())  # pruned entries exactly zero
    torch.testing.assert_close(merged["1.weight"], module.model[1].weight.detach())

    plain = _build_module(_validated({**read_run_recipe(one_dir), "plugins": []})).model
    plain.load_state_dict(merged)
    x = torch.randn(5, 64)
    torch.testing.assert_close(plain(x), module.model(x))
