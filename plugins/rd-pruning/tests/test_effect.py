"""The paper's effect, in direction: at high sparsity and without retraining, the rate-distortion
allocation keeps a digits MLP far more accurate than uniform per-layer magnitude pruning, and
about as accurate as global magnitude pruning (3 seeds; numbers in the method card)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.module import HookedModule
from paperhooks.tasks.data import DigitsConfig, build_digits
from paperhooks_rd_pruning import RdPruning, RdPruningConfig

SEEDS = (0, 1, 2)
SPARSITIES = (0.9, 0.95)


def _trained(seed: int):
    dm = build_digits(DigitsConfig(), seed)
    train, val = dm.train_set.tensors, dm.val_set.tensors
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    n = train["input"].shape[0]
    for _ in range(20):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(train["input"][idx]), train["target"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, train, val


@torch.no_grad()
def _accuracy_after_pruning(model, train, val, sparsity: float, how: str) -> float:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = pruning.add_masks(model)
    scores = pruning.magnitude_scores(pruning.local_weights(model, masks))
    if how == "uniform":
        keep = pruning.uniform_allocation(scores, sparsity)
    elif how == "global":
        keep = pruning.global_allocation(scores, sparsity)
    else:
        plugin = RdPruning(RdPruningConfig(maxsps=50))
        plugin.attach(HookedModule(model), train)
        keep = plugin.pruning_allocate(scores=scores, sparsity=sparsity, ctx=StepContext())
    pruning.set_masks(model, masks, keep)
    model.eval()
    acc = (model(val["input"]).argmax(1) == val["target"]).double().mean().item()
    for m in pruning.prunable(model).values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    model.load_state_dict(state)
    return acc


def test_rd_allocation_beats_uniform_and_matches_global_at_high_sparsity_without_retraining():
    torch.set_num_threads(1)
    acc = {}
    for seed in SEEDS:
        model, train, val = _trained(seed)
        for s in SPARSITIES:
            for how in ("uniform", "global", "rd"):
                acc[seed, s, how] = _accuracy_after_pruning(model, train, val, s, how)
    mean = {
        (s, h): sum(acc[seed, s, h] for seed in SEEDS) / len(SEEDS)
        for s in SPARSITIES
        for h in ("uniform", "global", "rd")
    }
    print({f"{s}/{h}": round(v, 3) for (s, h), v in mean.items()})
    for s in SPARSITIES:
        # far above uniform on every seed (the paper's main claim against uniform allocation)
        assert all(acc[seed, s, "rd"] > acc[seed, s, "uniform"] + 0.05 for seed in SEEDS), acc
        # not below global magnitude on average by more than 2 points (on this MLP they tie)
        assert mean[s, "rd"] >= mean[s, "global"] - 0.02, mean
