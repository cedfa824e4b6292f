"""The paper's effect, in direction: DSEE adapting a pretrained model and then pruning the merged
weight to 50% and tuning again keeps the accuracy of the dense adaptation (digits MLP pretrained
on classes 0–4, adapted to 5–9; 3 seeds; numbers in the method card)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.module import HookedModule
from paperhooks.tasks.data import DigitsConfig, build_digits
from paperhooks_dsee import Dsee, DseeConfig

SEEDS = (0, 1, 2)
CONFIG = {
    "r": 8,
    "num_sparse": 16,
    "iters": 2,
    "prune_mode": "wabs",
    "trainable": ("5.*",),
}  # head: model[5]


def _classes(t, lo):
    keep = (t["target"] >= lo) & (t["target"] < lo + 5)
    return {"input": t["input"][keep], "target": t["target"][keep]}


def _train(model, data, steps, lr, g):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    n = data["input"].shape[0]
    for _ in range(steps):
        idx = torch.randint(n, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(data["input"][idx]), data["target"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def _accuracy(model, data):
    model.eval()
    acc = (model(data["input"]).argmax(1) == data["target"]).double().mean().item()
    model.train()
    return acc


def run(seed: int, sparsity: float = 0.5, t1: int = 200, t2: int = 200) -> dict[str, float]:
    """dense: DSEE adapters, no pruning; dsee: adapt t1 steps, prune the merged weight to
    ``sparsity`` per layer, tune t2 steps; prune-first: prune the pretrained W, then adapt t1 + t2."""
    dm = build_digits(DigitsConfig(), seed)
    old, new, new_val = (
        _classes(dm.train_set.tensors, 0),
        _classes(dm.train_set.tensors, 5),
        _classes(dm.val_set.tensors, 5),
    )
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    _train(base, old, 300, 1e-2, torch.Generator().manual_seed(seed))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {}
    for how in ("dense", "dsee", "prune-first"):
        base.load_state_dict(state)
        module = HookedModule(base)
        plugin = Dsee(DseeConfig(**CONFIG))
        plugin.reparam_setup(module=module, ctx=StepContext(seed=seed))
        masks = pruning.add_masks(base)  # after the adapters, as the core orders them
        if how == "prune-first":  # W' = W here: the pretrained weight's magnitude
            pruning.set_masks(
                base,
                masks,
                pruning.uniform_allocation(
                    pruning.magnitude_scores(pruning.local_weights(base, masks)), sparsity
                ),
            )
        g = torch.Generator().manual_seed(seed + 100)
        _train(base, new, t1, 3e-3, g)
        if how == "dsee":
            scores = plugin.pruning_scores(
                params=pruning.local_weights(base, masks), module=module, ctx=StepContext()
            )
            pruning.set_masks(base, masks, pruning.uniform_allocation(scores, sparsity))
        _train(base, new, t2, 3e-3, g)
        if how != "dense":
            for k, w in pruning.local_weights(base, masks).items():  # the merged weights are sparse
                assert int((w == 0).sum()) >= round(sparsity * w.numel()), k
        out[how] = _accuracy(base, new_val)
        for layer in pruning.prunable(base).values():
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    return out


def test_pruned_dsee_keeps_the_accuracy_of_the_dense_adaptation():
    torch.set_num_threads(1)
    results = [run(seed) for seed in SEEDS]
    mean = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
    print(results, mean)
    assert mean["dsee"] >= mean["dense"] - 0.03, mean
