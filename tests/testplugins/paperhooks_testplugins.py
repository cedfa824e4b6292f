"""Small plugins for the core's own tests: one per family, each easy to check by hand.

They are installed for a test by writing a ``.dist-info`` with an ``entry_points.txt`` on
``sys.path`` (see ``conftest.py``), which is how ``importlib.metadata`` finds any installed
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paperhooks.plugin import Paper, Plugin, hookimpl

PAPER = Paper(
    title="A test paper",
    authors=("A. Author",),
    year=2024,
    venue="Tests",
    arxiv=None,
    bibtex="@misc{test2024,title={A test paper},author={Author, A.},year={2024}}",
    code="none found",
)

ALL_STRATEGIES = {
    "single": "tested",
    "ddp": "tested",
    "fsdp2": "tested",
    "fsdp": "untested",
    "deepspeed": "untested",
}


@dataclass(frozen=True)
class ScaleConfig:
    """Weight samples of class ``cls`` by ``factor``."""

    cls: int = 0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.factor < 0:
            raise ValueError(f"factor must be >= 0, got {self.factor}")


class ClassWeight(Plugin):
    Config = ScaleConfig
    family = "sample-weighting"
    paper = PAPER
    strategies = ALL_STRATEGIES

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        w = torch.ones_like(losses)
        w[batch["target"] == self.config.cls] = self.config.factor
        return w


@dataclass(frozen=True)
class LossRankConfig:
    crash_at: int = -1  # raise at this step, to test what a crash leaves behind
    crash_rank: int = -1  # raise on this rank only (-1: on every rank)
    refuse_at: int = -1  # raise a ValueError (bad input found mid-fit) at this step


class LossRank(Plugin):
    """Weights ∝ global rank of the loss (needs the global batch): w_i = 1 + rank_i."""

    Config = LossRankConfig
    family = "sample-weighting"
    paper = PAPER
    strategies = ALL_STRATEGIES

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        if ctx.step == self.config.crash_at and self.config.crash_rank in (-1, ctx.rank):
            raise RuntimeError(f"crash at step {ctx.step} on rank {ctx.rank}")
        if ctx.step == self.config.refuse_at:
            raise ValueError(f"loss-rank: refuse_at = {ctx.step}: this step's input is refused")
        self.calls += 1
        glob, mine = ctx.dist.all_gather_cat(losses)
        ranks = torch.argsort(torch.argsort(glob, stable=True), stable=True).to(losses.dtype)
        return 1.0 + ranks[mine]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class NoDDP(Plugin):
    family = "sample-weighting"
    paper = PAPER
    strategies = {"single": "tested", "ddp": "unsupported", "fsdp2": "unsupported"}

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return None


class Conflicting(Plugin):
    family = "sample-weighting"
    paper = PAPER
    incompatible_with = {"class-weight": "both rescale classes"}

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return None


@dataclass(frozen=True)
class SparsityConfig:
    final: float = 0.5
    every: int = 2


class StepPruning(Plugin):
    """Sparsity rises linearly to ``final`` over training, updated every ``every`` steps."""

    Config = SparsityConfig
    family = "pruning"
    paper = PAPER
    strategies = {"single": "tested", "ddp": "tested", "fsdp2": "unsupported"}

    @hookimpl
    def pruning_schedule(self, ctx):
        if ctx.step % self.config.every:
            return None
        return self.config.final * ctx.progress


class SumSurgery(Plugin):
    """Returns the set unchanged but records the gradients' Gram matrix (as a logged scalar)."""

    family = "gradient-surgery"
    paper = PAPER
    strategies = {"single": "tested", "ddp": "tested", "fsdp2": "unsupported"}

    @hookimpl
    def surgery_combine(self, grads, ctx):
        g = grads.gram()
        ctx.log("surgery/cos", g[0, -1] / (g[0, 0] * g[-1, -1]).sqrt().clamp_min(1e-30))
        return None


class MgdaSurgery(Plugin):
    """MGDA's min-norm combination from the Gram matrix alone (so it works on column shards)."""

    family = "gradient-surgery"
    paper = PAPER
    columns_ok = True
    strategies = {"single": "tested", "ddp": "tested", "fsdp2": "tested"}

    @hookimpl
    def surgery_combine(self, grads, ctx):
        from paperhooks.gradients import min_norm_weights

        alpha = min_norm_weights(grads.gram())
        ctx.log("mgda/alpha0", alpha[0])
        return grads.combine(alpha)


class MgdaSurgeryFull(MgdaSurgery):
    """The same, but declared to need the full layout (DDP all-reduces K×P)."""

    columns_ok = False
    strategies = {"single": "tested", "ddp": "tested", "fsdp2": "unsupported"}


class LogitPenalty(Plugin):
    """Objective term ``l2 = 0.05 · ‖logits‖²`` per sample: a second objective for surgery tests."""

    family = "objective"
    paper = PAPER

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        return {"l2": 0.05 * outputs["logits"].pow(2).sum(dim=1)}


@dataclass(frozen=True)
class CriticConfig:
    first_rows: int = 0  # > 0: the critic sees only the first rows of the global batch


class Critic(Plugin):
    """Trains a module of its own beside the model: ``critic = Linear(10, 1)`` on the logits,
    objective ``0.1 · critic(logits)²`` per sample (gradients reach the model and the critic).
    Under FSDP2 the core keeps the critic whole on every rank and averages its gradients.

    With ``first_rows`` = n > 0 the critic is called only on the first n rows of the global
    batch (the term is 0 elsewhere): on 2 processes with n = half the batch, rank 1 never
    calls it and has no critic gradient at all."""

    Config = CriticConfig
    family = "objective"
    paper = PAPER
    strategies = ALL_STRATEGIES

    @hookimpl
    def lifecycle_setup(self, module, ctx):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 1)
            module.add_module("critic", torch.nn.Linear(10, 1))

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        logits = outputs["logits"]
        n = self.config.first_rows
        if n <= 0:
            return {"critic": 0.1 * module.critic(logits).squeeze(-1).pow(2)}
        # rows are contiguous slices of the global batch, rank by rank (ShardedBatchSampler)
        position = ctx.rank * logits.shape[0] + torch.arange(logits.shape[0])
        term = torch.zeros(logits.shape[0])
        seen = position < n
        if seen.any():
            term = term.index_put((seen,), 0.1 * module.critic(logits[seen]).squeeze(-1).pow(2))
        return {"critic": term}


class Broken(Plugin):
    family = "sample-weighting"


# -- deliberately bad plugins, which the conformance kit must reject (tests/test_conformance.py) --
ALL_KINDS = {**ALL_STRATEGIES, "fsdp2": "untested"}


class ForgetfulCounter(Plugin):
    """Up-weights the class ``calls % 10`` but forgets ``calls`` in its checkpoint: resume differs."""

    family = "sample-weighting"
    paper = PAPER
    strategies = ALL_KINDS

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        self.calls += 1
        return torch.where(batch["target"] == self.calls % 10, 3.0, 1.0)


class LocalSoftmax(Plugin):
    """Softmax of this rank's losses only: on 2 processes it is not the global batch's weights."""

    family = "sample-weighting"
    paper = PAPER
    strategies = ALL_KINDS

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return torch.softmax(4.0 * losses, dim=0) * losses.numel()


@dataclass(frozen=True)
class ListConfig:
    sizes: list[int] = field(default_factory=lambda: [1, 2])  # recipes hold tuples, not lists


class ListConfigPlugin(Plugin):
    Config = ListConfig
    family = "sample-weighting"
    paper = PAPER
    strategies = ALL_KINDS

    @hookimpl
    def weighting_sample_weights(self, losses, batch, ctx):
        return None


class InfObjective(Plugin):
    """Adds a term that overflows float32: training goes to NaN within a few steps."""

    family = "objective"
    paper = PAPER
    strategies = ALL_KINDS

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        return {"blowup": 1e30 * outputs["logits"].square().sum(dim=1)}


@dataclass(frozen=True)
class ProbeConfig:
    out: str = ""  # folder for one file per rank


class MaskProbe(Plugin):
    """After every step, checks that each pruned entry is zero in the effective weight and in
    the stored one; at fit end writes this rank's masks and step count to ``out/rank<r>.pt``."""

    Config = ProbeConfig
    family = "metric"
    paper = PAPER
    strategies = ALL_STRATEGIES

    def __init__(self, config=None):
        super().__init__(config)
        self.checked = 0

    @hookimpl
    def lifecycle_step_end(self, module, ctx):
        from paperhooks import pruning

        layers = pruning.prunable(module.model)
        effective = pruning.local_weights(
            module.model, module.masks
        )  # under FSDP2: this rank's rows
        rows = pruning.local_rows(module.model, module.masks)
        for name, m in module.masks.items():
            pruned = ~m.mask[rows[name]]
            if not bool((effective[name][pruned] == 0).all()):
                raise AssertionError(
                    f"step {ctx.step}: a pruned entry of {name}.weight is not zero"
                )
            stored = pruning.stored(layers[name])
            stored = stored.to_local() if pruning.is_sharded(stored) else stored
            if pruning.only_mask(layers[name]) and not bool((stored[pruned] == 0).all()):
                raise AssertionError(
                    f"step {ctx.step}: a pruned entry of {name}'s stored weight is not zero"
                )
        self.checked += 1

    @hookimpl
    def lifecycle_fit_end(self, module, ctx):
        if self.config.out:
            state = {f"mask/{k}": m.mask.clone() for k, m in module.masks.items()}
            torch.save(
                {**state, "checked": torch.tensor(self.checked)},
                f"{self.config.out}/rank{ctx.rank}.pt",
            )

    def state_dict(self):
        return {"checked": self.checked}

    def load_state_dict(self, state):
        self.checked = state["checked"]
