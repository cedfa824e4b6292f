"""The paper's effect in direction: after one-shot magnitude pruning at high sparsity, PERP's
retraining (biases + LayerNorm + MaskLoRA) recovers most of the accuracy that full retraining
recovers, training a small fraction of the parameters.

Digits, an MLP with LayerNorm (64-128-64-10, LN after each hidden Linear), trained dense with
Adam; then 95% of the Linear weights pruned by global magnitude (``paperhooks.pruning``, the
core's masks), then 100 AdamW steps of retraining per arm, as the core stacks them: the
plugin's ``reparam_setup`` on the pruned plain weights, then the mask on top. Arms: no
retraining, biases + LN only (``method: none``), + MaskLoRA, + ScaleLoRA (r = 4), and full
retraining. A plain torch loop, so 3 seeds fit in well under a minute on one core; the staged
runs through Lightning are in ``test_perp.py``. Validation: the 797 digits not trained on.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from paperhooks import pruning
from paperhooks.reparam import merge
from paperhooks_perp import Perp, PerpConfig

SPARSITY, STEPS, SEEDS = 0.95, 100, (0, 1, 2)
ARMS = ("none", "mask_lora", "scale_lora")


def _data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1000], perm[1000:]


X, Y, TRAIN, VAL = _data()


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.LayerNorm(128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.LayerNorm(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _train(net, steps, lr, seed, masks=None):
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        rows = TRAIN[torch.randint(len(TRAIN), (64,), generator=g)]
        loss = nn.functional.cross_entropy(net(X[rows]), Y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if masks:
            with torch.no_grad():
                pruning.zero_pruned(net, masks)


@torch.no_grad()
def _acc(net) -> float:
    net.eval()
    return float((net(X[VAL]).argmax(1) == Y[VAL]).float().mean())


def _prune(net, keep=None):
    """The core's masks on ``net`` (after any parametrization); ``keep`` given or by global magnitude."""
    masks = pruning.add_masks(net)
    with torch.no_grad():
        if keep is None:
            keep = pruning.global_allocation(
                pruning.magnitude_scores(pruning.local_weights(net, masks)), SPARSITY
            )
        pruning.set_masks(net, masks, keep)
        pruning.zero_pruned(net, masks)
    return masks, keep


def _trainable(net) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def run(seed: int) -> dict[str, tuple[float, int]]:
    torch.manual_seed(seed)
    dense = _net()
    _train(dense, 400, 1e-2, seed)
    dense_acc = _acc(dense)
    masks, keep = _prune(dense)
    pruned = {
        k: v.clone() for k, v in merge(dense).state_dict().items()
    }  # plain weights, zeros pruned
    out = {"dense": (dense_acc, _trainable(dense)), "dense+prune (no retraining)": (_acc(dense), 0)}
    for arm in (*ARMS, "full"):
        torch.manual_seed(seed + 100)
        net = _net()
        net.load_state_dict(pruned)
        if arm != "full":
            Perp(PerpConfig(method=arm, r=4, alpha=8)).reparam_setup(
                module=SimpleNamespace(model=net), ctx=None
            )
        masks, _ = _prune(net, keep)
        n = _trainable(net)
        _train(net, STEPS, 5e-3, seed + 1, masks)
        acc = _acc(net)
        merged = merge(net)  # the adapter folded in: still exactly the pruned zeros, same function
        for k, layer in pruning.prunable(merged).items():
            assert bool((layer.weight[~keep[k]] == 0).all()), (arm, k)
        assert _acc(merged) == acc
        out[arm] = (acc, n)
    return out


@pytest.fixture(scope="module")
def results():
    return {seed: run(seed) for seed in SEEDS}


def test_perp_recovers_most_of_full_retraining_with_few_parameters(results):
    for seed, r in results.items():
        none_acc = r["dense+prune (no retraining)"][0]
        full_acc, full_n = r["full"]
        mask_acc, mask_n = r["mask_lora"]
        # far better than not retraining, in every seed
        assert mask_acc > none_acc + 0.2, (seed, r)
        assert r["scale_lora"][0] > none_acc + 0.2, (seed, r)
        assert r["none"][0] > none_acc + 0.05, (seed, r)
        # the adapters add to biases + LN alone
        assert mask_acc > r["none"][0], (seed, r)
        # with under a fifth of the trainable parameters of full retraining (which trains the
        # pruned weights' dense tensors), within 5 points of it
        assert mask_n < full_n / 5
        assert mask_acc > full_acc - 0.05, (seed, r)


if __name__ == "__main__":  # numbers for the method card
    import time

    t = time.time()
    for s in SEEDS:
        print(s, {k: (round(a, 4), n) for k, (a, n) in run(s).items()})
    print(f"{time.time() - t:.1f}s")
