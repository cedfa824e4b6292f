"""The paper's effect, in direction: a curriculum that down-weights the pairs the cheap ranker
disagrees with early gives a better model, selected on validation as the paper's runs are.

Task: ``digits-difficulty`` with 40% symmetric label noise; the heuristic is 1/rank of the
(possibly corrupted) label under the nearest-centroid ranker, so corrupted labels are the
"difficult" pairs. A 64→64→10 MLP, SGD (lr 0.1, momentum 0.9), batch 64, 20 epochs, through
:class:`paperhooks.Hooks` (the core's weighting and global normalization). The curriculum
(reciprank, pointwise) ends after 15 epochs; uniform weights afterwards.

Metric: the paper's protocol selects the best epoch on validation data. The 360 validation
digits (clean labels) are split in two: the epoch is chosen on the even half, the accuracy
reported on the odd half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paperhooks import Hooks
from paperhooks.tasks import build_datamodule
from paperhooks_rerank_curriculum import RerankCurriculum, RerankCurriculumConfig

EPOCHS, END, NOISE, BATCH = 20, 15.0, 0.4, 64


def selected_accuracy(seed: int, curriculum: bool) -> float:
    """Odd-half validation accuracy at the epoch that is best on the even half."""
    dm = build_datamodule(
        "digits-difficulty", {"label_noise": {"kind": "symmetric", "rate": NOISE}}, seed
    )
    train = dm.train_set.tensors
    xv, yv = dm.val_set.tensors["input"], dm.val_set.tensors["target"]
    select = torch.arange(len(yv)) % 2 == 0
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plugins = []
    if curriculum:
        plugin = RerankCurriculum(RerankCurriculumConfig(end_of_curriculum=END))
        plugin.name = "rerank-curriculum"
        plugins.append(plugin)
    hooks = Hooks(plugins, seed=seed)
    order = torch.Generator().manual_seed(seed)  # the same batches with and without curriculum
    n, step, history = train["target"].numel(), 0, []
    for epoch in range(EPOCHS):
        perm = torch.randperm(n, generator=order)
        for b in range(n // BATCH):
            batch = {k: v[perm[b * BATCH : (b + 1) * BATCH]] for k, v in train.items()}
            hooks.begin_step(step, epoch)
            losses = F.cross_entropy(model(batch["input"]), batch["target"], reduction="none")
            loss = hooks.weighted_mean(losses, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            correct = (model(xv).argmax(1) == yv).float()
        history.append((correct[select].mean().item(), correct[~select].mean().item()))
    best = max(range(EPOCHS), key=lambda e: history[e][0])
    return history[best][1]


def test_curriculum_beats_uniform_weights_on_noisy_digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add contention
    try:
        seeds = range(5)
        uniform = [selected_accuracy(s, curriculum=False) for s in seeds]
        curriculum = [selected_accuracy(s, curriculum=True) for s in seeds]
    finally:
        torch.set_num_threads(threads)
    # measured (torch 2.14.1, CPU): uniform 0.927 0.899 0.888 0.894 0.899 (mean 0.902),
    # curriculum 0.950 0.933 0.905 0.905 0.950 (mean 0.928): better on every seed, +2.7 points.
    # Asserted with margin: +1 point on the mean, not worse on at least 4 of the 5 seeds.
    gain = sum(curriculum) / 5 - sum(uniform) / 5
    assert gain > 0.01, (uniform, curriculum)
    assert sum(c >= u for c, u in zip(curriculum, uniform, strict=True)) >= 4, (uniform, curriculum)
