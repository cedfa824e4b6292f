"""The ``rerank-curriculum`` plugin: :mod:`.functional` wired to the sample-weighting hook."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_rerank_curriculum import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

BIBTEX = """\
@inproceedings{macavaney:sigir2020-cl,
  author    = {MacAvaney, Sean and Nardini, Franco Maria and Perego, Raffaele and Tonellotto, Nicola
               and Goharian, Nazli and Frieder, Ophir},
  title     = {Training Curricula for Open Domain Answer Re-Ranking},
  booktitle = {Proceedings of the 43rd International ACM SIGIR Conference on Research and
               Development in Information Retrieval},
  year      = {2020},
  eprint    = {2004.14269},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2004.14269}
}"""

#: batch key each heuristic reads (the official dataset field names)
BATCH_KEYS = {"reciprank": "rank", "normscore": "normscore", "kdescore": "kdescore"}


@dataclass(frozen=True)
class RerankCurriculumConfig:
    """Hyper-parameters; defaults from ``default_config`` of the official ``pointwise_cl.py``.

    :ivar heuristic: how the first-stage ranker scores a pair: ``reciprank`` (h = 1/rank, from
        ``batch["rank"]``), ``normscore`` or ``kdescore`` (h read from the batch key of that
        name). The official ``curriculum`` option; its first choice is ``reciprank``.
    :ivar mode: ``pointwise`` (one document per sample, relevance from ``relevance_key``) or
        ``pairwise`` (scores of shape ``[B, 1 + n]``, column 0 the relevant document).
    :ivar end_of_curriculum: m, the iteration at which weights become uniform (official
        ``eoc_epoch = 20``), counted in ``unit``.
    :ivar unit: what counts as an iteration i: ``epoch`` (as the official trainer; note that an
        OpenNIR "epoch" is 32 batches of 16), ``step`` (optimizer steps) or ``fraction``
        (of the whole fit; then m is in (0, 1]).
    :ivar anti: the inverse curriculum (official ``anti``): hard samples weighted high first.
    :ivar relevance_key: pointwise only: the batch key whose value > 0 marks a relevant pair
        (official ``relscore > 0``).
    """

    heuristic: Literal["reciprank", "normscore", "kdescore"] = "reciprank"
    mode: Literal["pointwise", "pairwise"] = "pointwise"
    end_of_curriculum: float = 20.0
    unit: Literal["epoch", "step", "fraction"] = "epoch"
    anti: bool = False
    relevance_key: str = "relevance"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.heuristic not in F.HEURISTICS:
            raise ValueError(
                f"{name}.heuristic must be one of {', '.join(F.HEURISTICS)}, got {self.heuristic!r}"
            )
        if self.mode not in ("pointwise", "pairwise"):
            raise ValueError(f"{name}.mode must be one of pointwise, pairwise, got {self.mode!r}")
        if self.unit not in ("epoch", "step", "fraction"):
            raise ValueError(f"{name}.unit must be one of epoch, step, fraction, got {self.unit!r}")
        m = self.end_of_curriculum
        if (
            isinstance(m, bool)
            or not isinstance(m, int | float)
            or not (math.isfinite(m) and m > 0)
        ):
            raise ValueError(f"{name}.end_of_curriculum must be a finite number > 0, got {m!r}")
        if self.unit == "fraction" and m > 1:
            raise ValueError(
                f"{name}.end_of_curriculum must be in (0, 1] with unit 'fraction', got {m!r}"
            )
        if not isinstance(self.anti, bool):
            raise ValueError(f"{name}.anti must be true or false, got {self.anti!r}")
        if not isinstance(self.relevance_key, str) or not self.relevance_key:
            raise ValueError(
                f"{name}.relevance_key must be a non-empty batch key, got {self.relevance_key!r}"
            )


class RerankCurriculum(Plugin):
    """Difficulty curriculum of MacAvaney et al. (SIGIR 2020), as the authors' OpenNIR trainers.

    Each step before the end of the curriculum, sample i gets ``W_i = D_i (1 − i/m) + i/m``,
    where D_i ∈ [0, 1] is the heuristic difficulty weight of the pair (1 = easy: the cheap
    ranker agrees with the label). From iteration m on the plugin abstains (uniform weights).
    The core then minimizes ``Σ_i W_i ℓ_i / Σ_j W_j`` over the global batch.

    The official trainers instead multiply each batch's mean loss by the batch's mean weight
    (``loss * weight.mean()``); the two agree for batches of one sample, and the weights'
    overall scale, which the official form keeps as a loss scale, is dropped here by the
    core's normalization (the paper's optimizer, Adam, is nearly invariant to it).

    The weights depend only on batch keys and on ``ctx.epoch``/``ctx.step``/``ctx.progress``,
    which are identical on all ranks and restored on resume: no state, no collectives except
    for the logged mean weight.
    """

    Config = RerankCurriculumConfig
    name = "rerank-curriculum"
    family: ClassVar[str] = "sample-weighting"
    paper: ClassVar[Paper] = Paper(
        title="Training Curricula for Open Domain Answer Re-Ranking",
        authors=(
            "Sean MacAvaney",
            "Franco Maria Nardini",
            "Raffaele Perego",
            "Nicola Tonellotto",
            "Nazli Goharian",
            "Ophir Frieder",
        ),
        year=2020,
        venue="SIGIR 2020",
        arxiv="2004.14269",
        bibtex=BIBTEX,
        code="https://github.com/Georgetown-IR-Lab/OpenNIR",
        checked_against=(
            "Georgetown-IR-Lab/OpenNIR @ 49bf6b0: onir/trainers/pointwise_cl.py and "
            "onir/trainers/pairwise_cl.py (heuristics reciprank/normscore/kdescore, the pos/neg "
            "switch, the pairwise min over negatives, anti, the 1e-8 smoothing, "
            "W = D(1 - epoch/eoc_epoch) + epoch/eoc_epoch while epoch < eoc_epoch, eoc_epoch = 20), "
            "onir/trainers/base.py (an epoch = batches_per_epoch 32 x batch_size 16) and "
            "onir/pipelines/default.py (best validation epoch kept); "
            "Georgetown-IR-Lab/curricula-neural-ir README (m = end-of-curriculum iteration, "
            "eoc_epoch=20). Not checked: the paper's own text, and how the datasets build "
            "normscore and kdescore (read precomputed from the batch)."
        ),
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: RerankCurriculumConfig

    def progress(self, ctx: StepContext) -> float:
        """p = i / m, the fraction of the curriculum done (>= 1 once it has ended)."""
        cfg = self.config
        if cfg.unit == "epoch":
            i = float(ctx.epoch)
        elif cfg.unit == "step":
            i = float(ctx.step)
        else:
            if not ctx.max_steps:
                raise ValueError(
                    f"{F.PLUGIN}: unit 'fraction' needs the total number of steps (ctx.max_steps), "
                    "which this run does not know; set trainer.max_steps or max_epochs, or use unit 'step'"
                )
            i = ctx.progress
        return i / cfg.end_of_curriculum

    def difficulty(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """D, shape ``[B]``, from the batch keys of the configured heuristic and mode."""
        cfg = self.config
        key = BATCH_KEYS[cfg.heuristic]
        needed = [key] + ([cfg.relevance_key] if cfg.mode == "pointwise" else [])
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ValueError(
                f"{F.PLUGIN}: heuristic {cfg.heuristic!r} ({cfg.mode}) reads batch keys {needed}, "
                f"but the batch lacks {missing} (it has {sorted(batch)}); use a dataset that "
                "provides them, e.g. digits-difficulty"
            )
        raw = batch[key]
        h = F.reciprocal_rank(raw) if cfg.heuristic == "reciprank" else F.check_heuristic(raw, key)
        if cfg.mode == "pairwise":
            return F.pairwise_difficulty(h, cfg.anti)
        if h.dim() != 1:
            raise ValueError(
                f"{F.PLUGIN}: pointwise batch[{key!r}] must have shape [B], got {tuple(h.shape)}"
            )
        relevant = batch[cfg.relevance_key].reshape(h.shape) > 0
        return F.pointwise_difficulty(h, relevant, cfg.anti)

    @hookimpl
    def weighting_sample_weights(
        self, losses: torch.Tensor, batch: Mapping[str, torch.Tensor], ctx: StepContext
    ) -> torch.Tensor | None:
        """W for this rank's samples while the curriculum runs; ``None`` (uniform) after it."""
        p = self.progress(ctx)
        if p >= 1:
            return None
        F.check_finite(losses)
        d = self.difficulty(batch)  # [B]
        if d.shape != losses.shape:
            raise ValueError(
                f"{F.PLUGIN}: the heuristic gives {tuple(d.shape)} weights for {tuple(losses.shape)} losses"
            )
        w = F.curriculum_weight(d.to(losses.device), p)  # [B]
        ctx.log(f"{F.PLUGIN}/progress", p)
        ctx.log(f"{F.PLUGIN}/mean_weight", dist.global_mean(w))
        return w
