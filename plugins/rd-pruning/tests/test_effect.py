"""The paper's effect, in direction: at high sparsity and without retraining, the rate-distortion
allocation keeps a deeper digits MLP with unequal layer widths (64-512-256-64-32-10) far more
accurate than both uniform per-layer and global magnitude pruning, on every seed (3 seeds;
numbers, the settings tried and where it does not show in the method card)."""

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
SPARSITY = 0.95
WIDTHS = (64, 512, 256, 64, 32, 10)
EPOCHS, BATCH, LR = 10, 64, 0.05
MAXSPS, CALIB_SIZE = 50, 128


def _trained(seed: int):
    dm = build_digits(DigitsConfig(), seed)
    train, val = dm.train_set.tensors, dm.val_set.tensors
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    n = train["input"].shape[0]
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
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
        # a coarser grid and fewer calibration rows than the defaults (100, 1024), for time;
        # the card's table uses the defaults
        plugin = RdPruning(RdPruningConfig(maxsps=MAXSPS, calib_size=CALIB_SIZE))
        plugin.attach(HookedModule(model), train)
        keep = plugin.pruning_allocate(scores=scores, sparsity=sparsity, ctx=StepContext())
    pruning.set_masks(model, masks, keep)
    model.eval()
    acc = (model(val["input"]).argmax(1) == val["target"]).double().mean().item()
    for m in pruning.prunable(model).values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    model.load_state_dict(state)
    return acc


def test_rd_allocation_beats_uniform_and_global_magnitude_at_high_sparsity_without_retraining():
    torch.set_num_threads(1)
    acc = {}
    for seed in SEEDS:
        model, train, val = _trained(seed)
        for how in ("uniform", "global", "rd"):
            acc[seed, how] = _accuracy_after_pruning(model, train, val, SPARSITY, how)
    print({f"{seed}/{h}": round(v, 3) for (seed, h), v in acc.items()})
    for seed in SEEDS:
        # global magnitude prunes the 512x256 layer to 99.9% (its weights are the smallest) and
        # the network falls to chance; the RD curves see that layer's output distortion
        assert acc[seed, "rd"] > acc[seed, "global"] + 0.10, acc
        assert acc[seed, "rd"] > acc[seed, "uniform"] + 0.10, acc
