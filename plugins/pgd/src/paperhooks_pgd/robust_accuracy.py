"""The ``pgd`` plugin's validation metric: accuracy on PGD adversarial examples.

Kept out of :mod:`paperhooks_pgd.plugin` because it subclasses ``torchmetrics.Metric``:
only :meth:`~paperhooks_pgd.plugin.PGD.metric_build` (and the package's lazy
``PGDRobustAccuracy``) import it, so loading the plugin does not import torchmetrics.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torchmetrics

from paperhooks import dist
from paperhooks_pgd import functional as F
from paperhooks_pgd.plugin import NAME, PGDConfig, _inputs, start_for_rank, task_losses


class PGDRobustAccuracy(torchmetrics.Metric):
    """Accuracy on PGD adversarial examples of the validation data (all of it, or its worst class).

    ``update(outputs, batch)`` attacks the module that built it (held by weak reference)
    with the plugin's ε, α, random start and bounds, and K = ``val_steps``. Lightning
    validates under ``torch.inference_mode``; the attack runs outside it on copies of the
    batch. Per-sample results are concatenated across ranks by torchmetrics.
    """

    full_state_update = False

    def __init__(self, module: Any, config: PGDConfig, seed: int, worst_class: bool) -> None:
        super().__init__()
        self._module = weakref.ref(module)
        self.cfg, self.seed, self.worst_class = config, seed, worst_class
        self.calls = 0  # validation batches seen since reset: keys the random starts
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> None:
        module, cfg = self._module(), self.cfg
        if module is None:
            raise RuntimeError(f"{NAME}: the module this metric attacks no longer exists")
        with torch.inference_mode(False):
            b = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            x = _inputs(b)
            delta0 = None
            if cfg.random_start:
                g = dist.step_generator(self.seed, self.calls, f"{NAME}.val", x.device)
                delta0 = start_for_rank(x, cfg.epsilon, g)
            x_adv = F.linf_pgd(
                lambda xa: task_losses(module, {**b, "input": xa}),
                x,
                cfg.epsilon,
                cfg.step_size,
                cfg.val_steps or cfg.steps,
                delta0=delta0,
                bounds=cfg.bounds,
            )
            with torch.no_grad():
                logits = module.outputs({**b, "input": x_adv}).get("logits")
        if logits is None:
            raise ValueError(f"{NAME}: robust accuracy needs classification outputs with 'logits'")
        self.calls += 1
        self.correct.append((logits.argmax(dim=-1) == b["target"]).float())
        self.target.append(b["target"])

    def compute(self) -> torch.Tensor:
        # [N]: 1.0 where x^K is still classified right
        correct = torchmetrics.utilities.dim_zero_cat(self.correct)
        target = torchmetrics.utilities.dim_zero_cat(self.target)  # [N]
        if not self.worst_class:
            return correct.mean()
        acc = F.class_means(correct, target, int(target.max()) + 1)  # [C]
        return acc[~acc.isnan()].min().to(torch.float32)

    def reset(self) -> None:
        super().reset()
        self.calls = 0


__all__ = ["PGDRobustAccuracy"]
