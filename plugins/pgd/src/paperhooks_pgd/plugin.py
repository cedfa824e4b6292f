"""The ``pgd`` plugin: :mod:`.functional` wired to the input-perturbation and metric hooks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_pgd import functional as F

if TYPE_CHECKING:
    import torchmetrics

    from paperhooks.context import StepContext

NAME = "pgd"
METRICS = ("robust_acc", "worst_class_robust_acc")

BIBTEX = """\
@inproceedings{madry2018towards,
  title     = {Towards Deep Learning Models Resistant to Adversarial Attacks},
  author    = {Madry, Aleksander and Makelov, Aleksandar and Schmidt, Ludwig and Tsipras, Dimitris
               and Vladu, Adrian},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2018},
  eprint    = {1706.06083},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/1706.06083}
}"""


def _number(name: str, value: Any, *, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"PGDConfig.{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"PGDConfig.{name} must be > 0, got {value!r}")


def _count(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an integer >= 1" + (" or null" if optional else "")
        raise ValueError(f"PGDConfig.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class PGDConfig:
    """Hyper-parameters; defaults from ``config.json`` of ``MadryLab/mnist_challenge`` (inputs in [0, 1]).

    :ivar epsilon: ε, radius of the ℓ∞ ball in input units (official MNIST 0.3; CIFAR-10
        8/255). On the 8×8 digits 0.1–0.3 is sensible.
    :ivar step_size: α, size of each signed step (official ``a`` = 0.01 with 40 steps on
        MNIST; 2/255 with 10 steps on CIFAR-10).
    :ivar steps: K, number of PGD steps (official ``k`` = 40 on MNIST, 10 on CIFAR-10).
    :ivar random_start: start from x + U(−ε, ε) (official ``random_start: true``).
    :ivar bounds: (lo, hi), the valid input range each step clips to (the official code
        clips to [0, 1] on MNIST and [0, 255] on CIFAR-10), or ``null`` for none.
    :ivar attack_mode: ``train`` runs the attack on the model as it trains (the official
        code: the same graph in training mode, so batch norm uses batch statistics and its
        moving averages are updated by the attack's forward passes as well); ``eval`` puts every
        submodule in eval mode during the attack and restores each one's mode afterwards
        (the choice of TRADES/MART-style code).
    :ivar val_metrics: robust metrics to add to validation, each costing one PGD attack per
        validation batch: ``robust_acc`` and/or ``worst_class_robust_acc`` (classification).
    :ivar val_steps: K for the validation attack (``null``: the training K).
    """

    epsilon: float = 0.3
    step_size: float = 0.01
    steps: int = 40
    random_start: bool = True
    bounds: tuple[float, float] | None = (0.0, 1.0)
    attack_mode: Literal["train", "eval"] = "train"
    val_metrics: tuple[Literal["robust_acc", "worst_class_robust_acc"], ...] = ()
    val_steps: int | None = None

    def __post_init__(self) -> None:
        _number("epsilon", self.epsilon)
        _number("step_size", self.step_size)
        _count("steps", self.steps)
        _count("val_steps", self.val_steps, optional=True)
        if not isinstance(self.random_start, bool):
            raise ValueError(
                f"PGDConfig.random_start must be true or false, got {self.random_start!r}"
            )
        if self.bounds is not None:
            if not (isinstance(self.bounds, tuple) and len(self.bounds) == 2):
                raise ValueError(f"PGDConfig.bounds must be [lo, hi] or null, got {self.bounds!r}")
            for v in self.bounds:
                _number("bounds", v, positive=False)
            if not self.bounds[0] < self.bounds[1]:
                raise ValueError(f"PGDConfig.bounds must have lo < hi, got {self.bounds!r}")
        if self.attack_mode not in ("train", "eval"):
            raise ValueError(
                f"PGDConfig.attack_mode must be one of 'train', 'eval', got {self.attack_mode!r}"
            )
        unknown = [m for m in self.val_metrics if m not in METRICS]
        if unknown or len(set(self.val_metrics)) != len(self.val_metrics):
            raise ValueError(
                f"PGDConfig.val_metrics must be distinct names among {', '.join(METRICS)}, got {list(self.val_metrics)!r}"
            )


# -- pieces shared by training and validation ------------------------------------------------
def task_losses(module: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The module's own per-sample losses at ``batch`` (a mapping of several is summed)."""
    out = module.losses(batch, module.outputs(batch))
    if isinstance(out, Mapping):
        out = sum(out.values())
    return out


def _inputs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    x = batch.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{NAME}: PGD perturbs a floating-point batch['input'], got {type(x).__name__}"
            f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}"
        )
    return x


def start_for_rank(x: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """δ⁰ for this rank's rows: one draw for the global batch (rank order), this rank's slice.

    The sampler gives rank r the r-th contiguous slice of each global batch, so every sample
    gets the start it gets on one process holding the whole global batch.
    """
    n = x.shape[0]
    before, total = 0, n
    if dist.is_distributed():
        sizes, _ = dist.all_gather_cat(torch.tensor([n], device=x.device))
        before, total = int(sizes[: dist.rank()].sum()), int(sizes.sum())
    delta = F.uniform_start((total, *x.shape[1:]), epsilon, generator)  # [B_global, ...]
    return delta[before : before + n].to(x.device)


@contextlib.contextmanager
def attack_mode(module: Any, mode: str) -> Iterator[None]:
    """``train``: the module as it is; ``eval``: every submodule in eval mode, restored after."""
    if mode == "train":
        yield
        return
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


class PGD(Plugin):
    """PGD adversarial training, Madry et al. (ICLR 2018), §2.1 and the official ``pgd_attack.py``.

    Each training step replaces ``batch["input"]`` by x^K, the K-step ℓ∞ PGD adversarial
    example of the module's own per-sample losses (:func:`~paperhooks_pgd.functional.linf_pgd`),
    so everything after it in the step (forward, losses, sample weights) sees the perturbed
    batch: the outer minimization of the saddle-point problem. The input gradients come from
    ``torch.autograd.grad`` inside ``ctx.no_sync()``: no parameter gradient, no DDP all-reduce.

    The random start is drawn from ``ctx.generator`` for the *global* batch and sliced per
    rank, so it is identical on any number of processes and on resume.

    Strategies: ``single``, ``ddp`` and ``fsdp2`` are tested (2 CPU processes equal one).
    ``fsdp`` and ``deepspeed`` need CUDA and are untested. A model whose samples interact in
    the forward pass (batch norm in training mode) differs between 1 and N processes by
    nature of the model, not of the plugin (use ``attack_mode: eval`` or sync batch norm).

    No learned state: the attack depends only on the weights, the batch and ``ctx.step``.
    """

    Config = PGDConfig
    name = NAME
    family: ClassVar[str] = "input-perturbation"
    extra_families: ClassVar[tuple[str, ...]] = ("metric",)
    paper: ClassVar[Paper] = Paper(
        title="Towards Deep Learning Models Resistant to Adversarial Attacks",
        authors=(
            "Aleksander Madry",
            "Aleksandar Makelov",
            "Ludwig Schmidt",
            "Dimitris Tsipras",
            "Adrian Vladu",
        ),
        year=2018,
        venue="ICLR 2018",
        arxiv="1706.06083",
        bibtex=BIBTEX,
        code="https://github.com/MadryLab/mnist_challenge",
        checked_against=(
            "MadryLab/mnist_challenge @ 6f91f83: pgd_attack.py (LinfPGDAttack.perturb: uniform random "
            "start, x += a*sign(grad), clip to the eps-ball then to [0, 1]), train.py (the attack on the "
            "training graph, loss model.xent = reduce_sum), config.json @ 41a60df (epsilon 0.3, k 40, "
            "a 0.01, random_start true, xent); MadryLab/cifar10_challenge @ 2fbf5bb: pgd_attack.py, "
            "train.py (Model(mode='train') attacked during training), config.json (epsilon 8, 10 steps "
            "of 2 on the 0-255 scale), model.py @ e3ad969 (batch_norm is_training=(mode == 'train'), "
            "updates_collections=None)."
        ),
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: PGDConfig

    @hookimpl
    def perturb_inputs(
        self, batch: Mapping[str, torch.Tensor], module: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        """The batch with ``input`` replaced by its PGD adversarial example x^K."""
        cfg = self.config
        x = _inputs(batch)
        delta0 = None
        if cfg.random_start:
            # batch_idx separates the micro-batches of one optimizer step (gradient accumulation)
            g = ctx.generator(f"{NAME}.start.{ctx.batch_idx}", x.device)
            delta0 = start_for_rank(x, cfg.epsilon, g)
        sums: dict[
            int, torch.Tensor
        ] = {}  # local Σ_i ℓ_i at x⁰ and at x^{K−1}, the last point a gradient was taken at

        def on_loss(t: int, losses: torch.Tensor) -> None:
            if t in (0, cfg.steps - 1):
                sums[t] = losses.to(torch.float64).sum()

        with attack_mode(module, cfg.attack_mode), ctx.no_sync():
            x_adv = F.linf_pgd(
                lambda xa: task_losses(module, {**batch, "input": xa}),
                x,
                cfg.epsilon,
                cfg.step_size,
                cfg.steps,
                delta0=delta0,
                bounds=cfg.bounds,
                on_loss=on_loss,
            )
        # one collective: the global means to log, and a count of non-finite inputs so that
        # every rank raises together (a NaN loss makes a NaN gradient sign, hence NaN inputs)
        bad = (~torch.isfinite(x_adv)).sum().to(torch.float64)
        n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        s0, s1, n, bad = dist.all_reduce_sum(
            torch.stack([sums[0], sums[cfg.steps - 1], n, bad])
        ).tolist()
        if bad or not (math.isfinite(s0) and math.isfinite(s1)):
            raise ValueError(
                f"{NAME}: the attack met a NaN/inf loss or input ({int(bad)} non-finite adversarial "
                f"input values, mean loss {s0 / n} at the start and {s1 / n} at the last step)"
            )
        ctx.log(f"{NAME}/loss_start", s0 / n)
        ctx.log(f"{NAME}/loss_last", s1 / n)
        return {**batch, "input": x_adv}

    @hookimpl
    def metric_build(self, module: Any, ctx: StepContext) -> Mapping[str, torchmetrics.Metric]:
        """``pgd/robust_acc`` and/or ``pgd/worst_class_robust_acc``, as ``val_metrics`` asks."""
        from paperhooks_pgd.robust_accuracy import PGDRobustAccuracy

        return {
            f"{NAME}/{m}": PGDRobustAccuracy(
                module, self.config, ctx.seed, worst_class=(m == "worst_class_robust_acc")
            )
            for m in self.config.val_metrics
        }


def __getattr__(name: str):  # noqa: ANN202
    """``PGDRobustAccuracy`` (now in :mod:`.robust_accuracy`) loads on first use: it imports
    torchmetrics, which loading the plugin should not pay for."""
    if name == "PGDRobustAccuracy":
        from paperhooks_pgd.robust_accuracy import PGDRobustAccuracy

        return PGDRobustAccuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
