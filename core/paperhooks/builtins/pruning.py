"""Baselines of the pruning family: one-shot and gradual (cubic) schedules, uniform allocation.

A pruning recipe names at most one plugin per role (schedule, criterion, allocation); the
core supplies the defaults of the roles no plugin takes: the magnitude criterion ``|w|``
and the global allocation (one threshold over every prunable weight). So::

    plugins:
      - {name: gradual-pruning, final_sparsity: 0.8, end_step: 300}   # schedule
      - {name: uniform-allocation}                                     # every layer at s_t

prunes every Linear/Conv weight of the model by magnitude, each layer to the same sparsity,
along Zhu & Gupta's cubic schedule. Without ``uniform-allocation`` the threshold is global.
There is no ``global-allocation`` plugin: the global threshold is what the core does when no
allocation plugin is named.

Schedules are called after every optimizer step with ``ctx.step`` = the number of steps
done, and once before the first step with ``ctx.step = 0`` (so ``one-shot-pruning`` at
step 0 prunes a model before any update, e.g. a trained model loaded for fine-tuning).

Every schedule counts in optimizer steps (``unit: step``, the default) or in epochs
(``unit: epoch``): a value e then means e·S optimizer steps, S = ``ctx.steps_per_epoch``
(Lightning's optimizer steps per epoch, after gradient accumulation, filled by the core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from paperhooks import pruning
from paperhooks.plugin import NoConfig, Paper, Plugin, Support, hookimpl

if TYPE_CHECKING:
    from paperhooks.context import StepContext

#: single process, DDP (replicated weights: every rank selects the same masks) and FSDP2 (each
#: rank scores its rows; exact selection over all ranks by ``dist.topk_mask``) are tested;
#: Lightning's ``fsdp`` and ``deepspeed`` are refused by the core (``recipe.CORE_UNSUPPORTED``)
STRATEGIES: dict[str, Support] = {
    "single": "tested",
    "ddp": "tested",
    "fsdp2": "tested",
    "fsdp": "unsupported",
    "deepspeed": "unsupported",
}

ZHU_GUPTA = Paper(
    title="To prune, or not to prune: exploring the efficacy of pruning for model compression",
    authors=("Michael Zhu", "Suyog Gupta"),
    year=2017,
    venue="NIPS 2017 Workshop (ML on the Phone and other Consumer Devices)",
    arxiv="1710.01878",
    bibtex="""\
@article{zhu2017prune,
  title   = {To prune, or not to prune: exploring the efficacy of pruning for model compression},
  author  = {Zhu, Michael and Gupta, Suyog},
  journal = {arXiv preprint arXiv:1710.01878},
  year    = {2017},
  url     = {https://arxiv.org/abs/1710.01878}
}""",
    code="https://github.com/tensorflow/tensorflow/tree/r1.15/tensorflow/contrib/model_pruning",
    checked_against=(
        "equation (1) of arXiv:1710.01878; defaults from get_pruning_hparams() in "
        "tensorflow/contrib/model_pruning/python/pruning.py (r1.15)"
    ),
)

HAN = Paper(
    title="Learning both Weights and Connections for Efficient Neural Networks",
    authors=("Song Han", "Jeff Pool", "John Tran", "William J. Dally"),
    year=2015,
    venue="NeurIPS 2015",
    arxiv="1506.02626",
    bibtex="""\
@inproceedings{han2015learning,
  title     = {Learning both Weights and Connections for Efficient Neural Networks},
  author    = {Han, Song and Pool, Jeff and Tran, John and Dally, William J.},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2015},
  eprint    = {1506.02626},
  archivePrefix = {arXiv}
}""",
    code="none found",
    checked_against="torch.nn.utils.prune.global_unstructured with L1Unstructured (equal masks, tested)",
)


def _sparsity(plugin: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{plugin}: {key} must be a number in [0, 1), got {value!r}")


def _step(plugin: str, key: str, value: Any, least: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{plugin}: {key} must be an integer >= {least}, got {value!r}")


#: what a schedule's step-valued keys count: optimizer steps, or epochs of ``ctx.steps_per_epoch`` steps
Unit = Literal["step", "epoch"]


def steps_per_epoch(plugin: str, keys: str, ctx: StepContext) -> int:
    """S, the optimizer steps of one epoch, for a schedule with ``unit: epoch`` (``keys``: its
    epoch-valued keys, named in the error); refused when unknown or 0."""
    s = ctx.steps_per_epoch
    if s is None:
        raise ValueError(
            f"{plugin}: unit: epoch counts {keys} in epochs, but the number of optimizer steps per epoch is unknown "
            "(the training data has no length, e.g. an iterable dataset, or no Lightning fit runs); use unit: step"
        )
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(
            f"{plugin}: unit: epoch counts {keys} in epochs, but an epoch has {s!r} optimizer steps (no training "
            "batch); use unit: step or give the fit training data"
        )
    return s


# -- one-shot ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OneShotConfig:
    """:ivar sparsity: fraction of the prunable weights set to zero, in [0, 1).
    :ivar step: prune once when this many optimizer steps (epochs with ``unit: epoch``) are
        done; 0 prunes before the first update (the model as loaded: prune a trained model,
        then fine-tune).
    :ivar unit: ``step`` or ``epoch``: what ``step`` counts; ``epoch`` e prunes after e·S
        optimizer steps, S = ``ctx.steps_per_epoch``.
    """

    sparsity: float = 0.5
    step: int = 0
    unit: Unit = "step"

    def __post_init__(self) -> None:
        _sparsity("one-shot-pruning", "sparsity", self.sparsity)
        _step("one-shot-pruning", "step", self.step)


class OneShotPruning(Plugin):
    """Prune to ``sparsity`` once, at ``step``; the masks then stay (the pruned weights stay zero).

    The baseline of magnitude pruning (Han et al., 2015, prune then retrain), with the amount
    given as a sparsity rather than Han's per-layer threshold (a multiple of the weights'
    standard deviation). With the core's defaults this is global magnitude pruning, the
    masks of ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=sparsity)``.
    """

    Config = OneShotConfig
    family = "pruning"
    paper = HAN
    strategies = STRATEGIES

    @hookimpl
    def pruning_schedule(self, ctx: StepContext) -> float | None:
        c = self.config
        at = (
            c.step
            if c.unit == "step"
            else c.step * steps_per_epoch("one-shot-pruning", "step", ctx)
        )
        return c.sparsity if ctx.step == at else None


# -- gradual (Zhu & Gupta) -------------------------------------------------------------------------
@dataclass(frozen=True)
class GradualConfig:
    """Defaults: TensorFlow's ``model_pruning`` (the paper's official code), ``get_pruning_hparams()``.

    :ivar initial_sparsity: s_i, the sparsity at ``begin_step`` (paper: "usually 0").
    :ivar final_sparsity: s_f, reached at ``end_step`` and kept after it.
    :ivar begin_step: t_0, the first pruning step.
    :ivar end_step: t_0 + nΔt, the last pruning step; ``end_step - begin_step`` must be a
        multiple of ``frequency``.
    :ivar frequency: Δt, optimizer steps between two mask updates.
    :ivar exponent: 3 in the paper's equation (1) (``sparsity_function_exponent``).
    :ivar unit: ``step`` or ``epoch``: what ``begin_step``, ``end_step`` and ``frequency``
        count; with ``epoch`` each value v stands for v·S optimizer steps (S =
        ``ctx.steps_per_epoch``), so t_0, nΔt and Δt are whole epochs.
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 100
    frequency: int = 10
    exponent: float = 3.0
    unit: Unit = "step"

    def __post_init__(self) -> None:
        name = "gradual-pruning"
        _sparsity(name, "initial_sparsity", self.initial_sparsity)
        _sparsity(name, "final_sparsity", self.final_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"{name}: initial_sparsity ({self.initial_sparsity}) must be <= final_sparsity ({self.final_sparsity})"
            )
        _step(name, "begin_step", self.begin_step)
        _step(name, "frequency", self.frequency, least=1)
        _step(name, "end_step", self.end_step, least=self.begin_step + 1)
        if (self.end_step - self.begin_step) % self.frequency:
            raise ValueError(
                f"{name}: end_step - begin_step ({self.end_step} - {self.begin_step}) must be a multiple of "
                f"frequency ({self.frequency}): the schedule prunes at t_0 + kΔt, k = 0..n"
            )
        if (
            isinstance(self.exponent, bool)
            or not isinstance(self.exponent, int | float)
            or not (math.isfinite(self.exponent) and self.exponent > 0)
        ):
            raise ValueError(f"{name}: exponent must be a number > 0, got {self.exponent!r}")


def in_steps(c: GradualConfig, steps_per_epoch: int) -> GradualConfig:
    """``c`` with ``unit: epoch`` as the same schedule in optimizer steps: t_0, t_0 + nΔt and Δt
    times S (S = ``steps_per_epoch``); a ``unit: step`` config is returned as it is."""
    if c.unit == "step":
        return c
    s = steps_per_epoch
    return replace(
        c,
        begin_step=c.begin_step * s,
        end_step=c.end_step * s,
        frequency=c.frequency * s,
        unit="step",
    )


def cubic_sparsity(t: int, c: GradualConfig, steps_per_epoch: int | None = None) -> float | None:
    """Equation (1) of Zhu & Gupta (2017), or ``None`` when ``t`` is not a pruning step.

    s_t = s_f + (s_i − s_f)·(1 − (t − t_0)/(nΔt))³   for t ∈ {t_0, t_0 + Δt, ..., t_0 + nΔt}

    ``t`` is in optimizer steps; a ``unit: epoch`` config needs ``steps_per_epoch`` (S).
    """
    if c.unit == "epoch":
        if steps_per_epoch is None:
            raise ValueError(
                "gradual-pruning: unit: epoch needs steps_per_epoch to count begin_step, end_step, frequency"
            )
        c = in_steps(c, steps_per_epoch)
    if t < c.begin_step or t > c.end_step or (t - c.begin_step) % c.frequency:
        return None
    frac = (t - c.begin_step) / (c.end_step - c.begin_step)
    return c.final_sparsity + (c.initial_sparsity - c.final_sparsity) * (1.0 - frac) ** c.exponent


class GradualPruning(Plugin):
    """Zhu & Gupta's automated gradual pruning: sparsity rises from s_i to s_f along a cubic.

    Equation (1) of arXiv:1710.01878: over ``n`` pruning steps, one every Δt optimizer steps
    from t_0, the sparsity is ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(nΔt))³``; the masks are
    updated only at those steps (fast at first, when redundant weights abound, slower as
    fewer remain), and pruned weights stay pruned. The paper prunes each layer to ``s_t``
    (add ``uniform-allocation``); the core's default allocation is global.
    """

    Config = GradualConfig
    family = "pruning"
    paper = ZHU_GUPTA
    strategies = STRATEGIES

    @hookimpl
    def pruning_schedule(self, ctx: StepContext) -> float | None:
        c = self.config
        if c.unit == "epoch":
            c = in_steps(
                c, steps_per_epoch("gradual-pruning", "begin_step, end_step, frequency", ctx)
            )
        return cubic_sparsity(ctx.step, c)


# -- iterative prune–retrain (Han et al.) ----------------------------------------------------------
@dataclass(frozen=True)
class IterativeConfig:
    """No paper default: Han et al. prune a trained network and leave the number of cycles open.

    :ivar final_sparsity: s_f, reached at the last cycle and kept after it, in [0, 1).
    :ivar cycles: n ≥ 1 prune–retrain cycles; each prunes the fraction
        r = 1 − (1 − s_f)^{1/n} of the weights still unpruned (``cycles: 1`` is one-shot).
    :ivar begin: the first prune, after this many optimizer steps (epochs with ``unit:
        epoch``) of dense training; 0 prunes before the first update.
    :ivar every: steps (epochs) of retraining between two prunes; cycle k prunes at
        ``begin + (k − 1)·every``, and the steps after the last prune retrain the final mask.
    :ivar unit: ``step`` or ``epoch``: what ``begin`` and ``every`` count (epoch: ×S,
        S = ``ctx.steps_per_epoch``).
    """

    final_sparsity: float = 0.9
    cycles: int = 3
    begin: int = 100
    every: int = 100
    unit: Unit = "step"

    def __post_init__(self) -> None:
        name = "iterative-pruning"
        _sparsity(name, "final_sparsity", self.final_sparsity)
        _step(name, "cycles", self.cycles, least=1)
        _step(name, "begin", self.begin)
        _step(name, "every", self.every, least=1)

    @property
    def rate(self) -> float:
        """r = 1 − (1 − s_f)^{1/n}: the fraction of the remaining weights each cycle prunes."""
        return 1.0 - (1.0 - self.final_sparsity) ** (1.0 / self.cycles)


def iterative_sparsity(
    t: int, c: IterativeConfig, steps_per_epoch: int | None = None
) -> float | None:
    """The sparsity of cycle k at its step, or ``None`` when ``t`` is not a pruning step.

    Cycle k = 1..n prunes at t_k = begin + (k − 1)·every (×S with ``unit: epoch``) to

        s_k = 1 − (1 − r)^k = 1 − (1 − s_f)^{k/n},   r = 1 − (1 − s_f)^{1/n},

    i.e. it removes the fraction r of the weights still unpruned after cycle k − 1
    (s_k − s_{k−1} = r·(1 − s_{k−1})); s_n = s_f exactly.
    """
    begin, every = c.begin, c.every
    if c.unit == "epoch":
        if steps_per_epoch is None:
            raise ValueError(
                "iterative-pruning: unit: epoch needs steps_per_epoch to count begin, every"
            )
        begin, every = begin * steps_per_epoch, every * steps_per_epoch
    if t < begin or (t - begin) % every:
        return None
    k = (t - begin) // every + 1
    if k > c.cycles:
        return None
    if k == c.cycles:
        return c.final_sparsity
    return 1.0 - (1.0 - c.final_sparsity) ** (k / c.cycles)


class IterativePruning(Plugin):
    """Han et al. (2015): prune, retrain, prune again: ``cycles`` magnitude prunes ``every`` apart.

    Section 3.3 (*Iterative Pruning*) of arXiv:1506.02626: "Pruning followed by a retraining
    is one iteration"; repeated, it reaches a higher sparsity at the same accuracy than
    "single-step aggressive pruning" (9× vs 5× on AlexNet). Here cycle k removes the
    fraction r = 1 − (1 − s_f)^{1/n} of the weights still in, so after k of n cycles the
    sparsity is s_k = 1 − (1 − s_f)^{k/n} (the schedule of iterative magnitude pruning
    without weight rewinding), by the core's magnitude criterion and global threshold unless
    a criterion or allocation plugin is named. Han prunes by a per-layer threshold (a
    multiple of each layer's weight standard deviation); the amount is a sparsity here.
    Retraining is the ordinary training between prunes (same optimizer, same learning-rate
    schedule); pruned weights stay pruned.
    """

    Config = IterativeConfig
    family = "pruning"
    paper = HAN
    strategies = STRATEGIES

    @hookimpl
    def pruning_schedule(self, ctx: StepContext) -> float | None:
        c = self.config
        s = steps_per_epoch("iterative-pruning", "begin, every", ctx) if c.unit == "epoch" else None
        return iterative_sparsity(ctx.step, c, s)


# -- uniform allocation --------------------------------------------------------------------------
class UniformAllocation(Plugin):
    """Every prunable layer at the scheduled sparsity: each prunes ``round(s·n_l)`` of its ``n_l``.

    Zhu & Gupta's allocation (their TensorFlow code thresholds each weight tensor
    separately). The lowest scores of each layer go (the core's magnitude criterion unless a
    criterion plugin is named); of equal scores the earlier entry is kept.
    """

    Config = NoConfig
    family = "pruning"
    paper = ZHU_GUPTA
    strategies = STRATEGIES

    @hookimpl
    def pruning_allocate(self, scores: Any, sparsity: float, ctx: StepContext) -> Any:
        return pruning.uniform_allocation(scores, sparsity, sharded=pruning.sharded_run(ctx))


# -- method cards (the docs' plugin pages; the core distribution's README is not one) -----------
_SHARED = """
## Use

```yaml
plugins:
  - {name: gradual-pruning, final_sparsity: 0.8, begin_step: 0, end_step: 300, frequency: 10}
  - {name: uniform-allocation}      # optional: every layer at s_t (default: one global threshold)
```

Masks are `torch.nn.utils.parametrize` parametrizations (`W = original ⊙ M`) on every
Linear/Conv weight; pruned entries are exactly zero after every optimizer step and after a
resume (the stored `original` is zeroed there too when the mask is its only
parametrization). The run logs `pruning/sparsity` and `pruning/sparsity/<layer>` at every
step; `paperhooks export` folds the masks in and reports the nonzero count and sparsity of
each layer in the model card. See the docs page *Pruning*.
"""

CARDS: dict[str, str] = {
    "one-shot-pruning": """# one-shot-pruning

Prune to `sparsity` once, when `step` optimizer steps are done (`step: 0`: before the
first update), then train on with the masks fixed. With `unit: epoch`, `step` counts
epochs (e × S optimizer steps, S the steps of one epoch). Built into the core distribution.

## Checked against

Global magnitude masks equal `torch.nn.utils.prune.global_unstructured` with
`L1Unstructured` and the same `amount` on the same weights (`round(amount·N)` pruned;
ties kept in order), tested in `tests/test_pruning.py`.

## Measured effect

A baseline: no claim of its own.
"""
    + _SHARED,
    "gradual-pruning": """# gradual-pruning

Zhu & Gupta (2017), *To prune, or not to prune*, equation (1):
`s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(nΔt))³` for `t ∈ {t_0, t_0 + Δt, …, t_0 + nΔt}`.
Built into the core distribution. Config: `initial_sparsity` (s_i), `final_sparsity`
(s_f), `begin_step` (t_0), `end_step` (t_0 + nΔt), `frequency` (Δt), `exponent` (3), and
`unit` (`step`, or `epoch`: t_0, t_0 + nΔt and Δt in epochs of S optimizer steps; the same
masks as the step schedule with the values times S, tested).

## Checked against

Equation (1) of arXiv:1710.01878 (values at given steps worked out by hand in
`tests/test_pruning.py`); defaults from `get_pruning_hparams()` of the paper's official
TensorFlow code (`tensorflow/contrib/model_pruning`): s_i = 0, s_f = 0.5, t_0 = 0,
nΔt = 100, Δt = 10.

## Measured effect

A baseline. `recipes/gradual-pruning.yaml` (MLP 64-128-64-10 on digits, 20 epochs, 90%
sparsity reached at step 300 of 460; seed 0, one run each): dense `val/acc` 0.964, 90%
sparse with `uniform-allocation` 0.950, 90% sparse with the global threshold 0.950.
"""
    + _SHARED,
    "iterative-pruning": """# iterative-pruning

Han et al. (2015), *Learning both Weights and Connections for Efficient Neural Networks*,
section 3.3: prune, retrain, prune again. Cycle k = 1..n prunes at step
`begin + (k − 1)·every` the fraction r = 1 − (1 − s_f)^{1/n} of the weights still
unpruned, so the sparsity after it is s_k = 1 − (1 − r)^k = 1 − (1 − s_f)^{k/n}, and s_n =
s_f exactly; the training between prunes (and after the last) is the retraining. Config:
`final_sparsity` (s_f), `cycles` (n), `begin`, `every`, `unit` (`step`, or `epoch`: `begin`
and `every` in epochs of S optimizer steps). `cycles: 1` is one-shot pruning at `begin`.
Built into the core distribution. Without weight rewinding (this is not the lottery-ticket
rewind: retraining continues from the pruned weights, as in Han et al.).

## Checked against

The sequence worked out by hand in `tests/test_pruning.py` (s_f = 0.875, n = 3: r = 0.5,
s_k = 0.5, 0.75, 0.875 at the cycle steps, in steps and in epochs). Each cycle prunes
`round(s_k·N)` of all N weights (or of each layer with `uniform-allocation`), the core's
count for a sparsity; `torch.nn.utils.prune` applied n times instead prunes
`round(r·remaining)` more each time, which can differ by one weight per cycle. Han et al.
prune by a per-layer threshold (a quality parameter times the layer's weight standard
deviation) and retrain with a lower learning rate; here the amount is a sparsity and the
retraining uses the recipe's optimizer and schedule.

## Measured effect

Han et al.: iterative pruning reaches a given accuracy at a higher sparsity than
"single-step aggressive pruning". On digits (MLP 64-64-10, 10 epochs of 11 steps, SGD 0.1,
dense for 2 epochs, 90% by global magnitude): 3 cycles at epochs 2, 4, 6 end above one-shot
to 90% at epoch 2 in the same 110 steps, `val/acc` +0.006, +0.017, +0.031 (seeds 0–2,
pinned in `tests/test_pruning.py`; over seeds 0–7: 7 wins and 1 tie, mean +0.014), and
above one-shot at epoch 6 (the last cycle's step) in 7 of 8 seeds (mean +0.008, one loss).
`recipes/iterative-pruning.yaml` (MLP 64-128-64-10, 20 epochs, cycles at epochs 5, 8, 11;
seed 0, one run each): dense 0.964, iterative 0.961, one-shot at epoch 5 0.950, one-shot
at epoch 11 0.955, iterative with `uniform-allocation` 0.953.
"""
    + _SHARED,
    "uniform-allocation": """# uniform-allocation

Each prunable layer at the scheduled sparsity: `round(s·n_l)` of its `n_l` weights pruned,
by the criterion's lowest scores (magnitude by default). Zhu & Gupta's allocation. Built
into the core distribution.

## Checked against

Per layer, equal to `torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=s)`
(tested in `tests/test_pruning.py`).

## Measured effect

A baseline: no claim of its own.
"""
    + _SHARED,
}

__all__ = [
    "CARDS",
    "GradualPruning",
    "IterativePruning",
    "OneShotPruning",
    "UniformAllocation",
    "cubic_sparsity",
    "in_steps",
    "iterative_sparsity",
    "steps_per_epoch",
]
