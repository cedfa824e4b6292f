"""The context every hook receives: where training is, and the collectives to use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from paperhooks import dist


@dataclass
class StepContext:
    """Progress and services for hooks. One instance per run; the core updates it each step.

    :ivar step: optimizer steps completed before this one (Lightning's ``global_step``).
    :ivar epoch: current epoch (0-based).
    :ivar max_steps: total optimizer steps of the fit when known, else ``None``.
    :ivar steps_per_epoch: optimizer steps in one epoch, as Lightning counts them:
        ``ceil(num_training_batches / accumulate_grad_batches)`` (per process; the global
        batch is fixed, so the same on 1 and N processes). Filled by the core when training
        starts (fresh or resumed), before the first schedule call; ``None`` when the training
        data has no length (an iterable dataset) or outside a Lightning fit.
    :ivar seed: the recipe's seed.
    :ivar strategy: strategy kind: one of :data:`paperhooks.plugin.STRATEGIES`.
    :ivar logging_step: whether the trainer writes this step's logs (Lightning's
        ``log_every_n_steps``), or this is the fit's last step; set by the core at the start
        of every training step, ``True`` outside a fit. Values passed to :meth:`log` reach
        Lightning on these steps, so a plugin whose per-step diagnostics cost something (a
        pass over the weights, a host read, a few small ops on a small model) can skip
        computing them when this is ``False``.
    """

    seed: int = 0
    step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    max_steps: int | None = None
    max_epochs: int | None = None
    steps_per_epoch: int | None = None
    strategy: str = "single"
    logging_step: bool = True
    logged: dict[str, torch.Tensor | float] = field(default_factory=dict)
    #: set by the core: a context manager that skips DDP gradient synchronization
    _no_sync: Any = None

    # -- progress -------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction of training done in [0, 1] (by steps when known, else 0)."""
        if self.max_steps:
            return min(1.0, self.step / self.max_steps)
        return 0.0

    # -- processes ------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return dist.world_size()

    @property
    def rank(self) -> int:
        return dist.rank()

    dist = dist  # the collectives module, for ``ctx.dist.all_reduce_sum(...)``

    def generator(self, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator identical on all ranks for this step and stream (and on resume)."""
        return dist.step_generator(self.seed, self.step, stream, device)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Run backward passes inside without DDP gradient all-reduce (e.g. to build inputs)."""
        if self._no_sync is None:
            yield
        else:
            with self._no_sync():
                yield

    # -- logging --------------------------------------------------------------------------
    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Log a scalar that shows a plugin working; values must already be global. The core
        passes the latest value of each name to Lightning on the next :attr:`logging_step`
        step (Lightning writes on_step values on those steps only)."""
        self.logged[name] = value.detach() if isinstance(value, torch.Tensor) else value
