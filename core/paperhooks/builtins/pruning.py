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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


# -- one-shot ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OneShotConfig:
    """:ivar sparsity: fraction of the prunable weights set to zero, in [0, 1).
    :ivar step: prune once when this many optimizer steps are done; 0 prunes before the
        first update (the model as loaded: prune a trained model, then fine-tune).
    """

    sparsity: float = 0.5
    step: int = 0

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
        return self.config.sparsity if ctx.step == self.config.step else None


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
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    begin_step: int = 0
    end_step: int = 100
    frequency: int = 10
    exponent: float = 3.0

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
        if isinstance(self.exponent, bool) or not isinstance(self.exponent, int | float) or not (
            math.isfinite(self.exponent) and self.exponent > 0
        ):
            raise ValueError(f"{name}: exponent must be a number > 0, got {self.exponent!r}")


def cubic_sparsity(t: int, c: GradualConfig) -> float | None:
    """Equation (1) of Zhu & Gupta (2017), or ``None`` when ``t`` is not a pruning step.

    s_t = s_f + (s_i − s_f)·(1 − (t − t_0)/(nΔt))³   for t ∈ {t_0, t_0 + Δt, ..., t_0 + nΔt}
    """
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
        return cubic_sparsity(ctx.step, self.config)


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
first update), then train on with the masks fixed. Built into the core distribution.

## Checked against

Global magnitude masks equal `torch.nn.utils.prune.global_unstructured` with
`L1Unstructured` and the same `amount` on the same weights (`round(amount·N)` pruned;
ties kept in order), tested in `tests/test_pruning.py`.

## Measured effect

A baseline: no claim of its own.
""" + _SHARED,
    "gradual-pruning": """# gradual-pruning

Zhu & Gupta (2017), *To prune, or not to prune*, equation (1):
`s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(nΔt))³` for `t ∈ {t_0, t_0 + Δt, …, t_0 + nΔt}`.
Built into the core distribution. Config: `initial_sparsity` (s_i), `final_sparsity`
(s_f), `begin_step` (t_0), `end_step` (t_0 + nΔt), `frequency` (Δt), `exponent` (3).

## Checked against

Equation (1) of arXiv:1710.01878 (values at given steps worked out by hand in
`tests/test_pruning.py`); defaults from `get_pruning_hparams()` of the paper's official
TensorFlow code (`tensorflow/contrib/model_pruning`): s_i = 0, s_f = 0.5, t_0 = 0,
nΔt = 100, Δt = 10.

## Measured effect

A baseline. `recipes/gradual-pruning.yaml` (MLP 64-128-64-10 on digits, 20 epochs, 90%
sparsity reached at step 300 of 460; seed 0, one run each): dense `val/acc` 0.964, 90%
sparse with `uniform-allocation` 0.950, 90% sparse with the global threshold 0.950.
""" + _SHARED,
    "uniform-allocation": """# uniform-allocation

Each prunable layer at the scheduled sparsity: `round(s·n_l)` of its `n_l` weights pruned,
by the criterion's lowest scores (magnitude by default). Zhu & Gupta's allocation. Built
into the core distribution.

## Checked against

Per layer, equal to `torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=s)`
(tested in `tests/test_pruning.py`).

## Measured effect

A baseline: no claim of its own.
""" + _SHARED,
}

__all__ = ["CARDS", "GradualPruning", "OneShotPruning", "UniformAllocation", "cubic_sparsity"]
