"""The FEBS experiment: digits with a small identity group whose images are rotated by 90°.

Group 1 is a random 5% of the training images (half of the validation images), rotated by
90°; the rest is group 0. The group is not an input: the network must learn the rotated digits
from few examples, so group 1 has the larger training error — the situation FEBS targets.
Training goes through the core's ``Hooks`` exactly as ``HookedModule`` runs a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paperhooks.functional import Hooks
from paperhooks.plugin import Plugin
from paperhooks.tasks import DigitsConfig, build_datamodule
from paperhooks_febs import GroupPerformance


def rotated_group_digits(seed: int, fraction: float = 0.05) -> dict[str, torch.Tensor]:
    dm = build_datamodule("digits", DigitsConfig(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for split, ds, frac in (("train", dm.train_set, fraction), ("val", dm.val_set, 0.5)):
        x, y = ds.tensors["input"].clone(), ds.tensors["target"]
        group = (torch.rand(len(y), generator=g) < frac).long()
        x[group == 1] = x[group == 1].transpose(-1, -2).flip(-1)
        out |= {f"{split}_x": x, f"{split}_y": y, f"{split}_group": group}
    return out


def train_and_eval(
    seed: int, plugins: list[Plugin], epochs: int = 15, batch_size: int = 64
) -> dict[str, float]:
    """One run (see :func:`_train_and_eval`) on one CPU thread: faster for this small network and
    steady on a busy machine; the caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_eval(seed, plugins, epochs, batch_size)
    finally:
        torch.set_num_threads(threads)


def _train_and_eval(
    seed: int, plugins: list[Plugin], epochs: int = 15, batch_size: int = 64
) -> dict[str, float]:
    """SGD (lr 0.05, momentum 0.9) of an MLP 64-32-10 on cross-entropy plus the plugins' terms.

    Returns validation accuracy overall, of the worst group, ES-Acc, and the mean FEBS weight
    of each group over training (when the febs plugin logged them).
    """
    d = rotated_group_digits(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    hooks = Hooks(plugins, seed=seed)
    n, step, w_sum = len(d["train_y"]), 0, torch.zeros(2)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(n // batch_size):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            batch = {
                "input": d["train_x"][idx],
                "target": d["train_y"][idx],
                "group": d["train_group"][idx],
            }
            hooks.begin_step(step, epoch, b)
            logits = net(batch["input"])
            ce = F.cross_entropy(logits, batch["target"], reduction="none")
            objectives = hooks.objectives(net, batch, {"logits": logits}, ce)
            loss = hooks.total(hooks.reduce(objectives, None))
            opt.zero_grad()
            loss.backward()
            opt.step()
            logged = hooks.log_items()
            if "febs/w0" in logged:
                w_sum += torch.stack([logged["febs/w0"], logged["febs/w1"]])
            step += 1
    val = {"target": d["val_y"], "group": d["val_group"]}
    with torch.no_grad():
        outputs = {"logits": net(d["val_x"])}
    es, worst = GroupPerformance(2), GroupPerformance(2, statistic="worst")
    es.update(outputs, val)
    worst.update(outputs, val)
    overall = float((outputs["logits"].argmax(1) == d["val_y"]).float().mean())
    return {
        "overall": overall,
        "worst": float(worst.compute()),
        "es": float(es.compute()),
        "w0": float(w_sum[0] / step),
        "w1": float(w_sum[1] / step),
    }
