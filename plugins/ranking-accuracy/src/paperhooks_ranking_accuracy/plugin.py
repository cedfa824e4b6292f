"""The ``ranking-accuracy`` plugin: :mod:`.functional` wired to the metric hooks through the
count metrics of :mod:`.pair_count` (imported only when metrics are built)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from paperhooks.plugin import Paper, Plugin, Support, hookimpl

if TYPE_CHECKING:
    import torchmetrics

    from paperhooks.context import StepContext

NAME = "ranking-accuracy"

BIBTEX = """\
@misc{chen2024preference,
  title     = {Preference Learning Algorithms Do Not Learn Preference Rankings},
  author    = {Angelica Chen and Sadhika Malladi and Lily H. Zhang and Xinyi Chen and Qiuyi Zhang and Rajesh Ranganath and Kyunghyun Cho},
  year      = {2024},
  note      = {NeurIPS 2024},
  eprint    = {2405.19534},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2405.19534},
}"""


KINDS = ("ranking", "idealized", "ranking_ln", "idealized_ln")


@dataclass(frozen=True)
class RankingAccuracyConfig:
    """Settings; defaults from the paper (App. C.4) and its official code.

    :ivar beta: β of the idealized optimum (Theorem 3.1); ``None``: the recipe's
        ``objective.beta`` (the β the policy is trained with). The paper reports
        β ∈ {0.01, 0.1, 1, 5, 10}.
    :ivar alpha: α = P(y_w ≻ y_l), the rater proportion, for pairs whose batch has no
        ``alpha_key``. 1.0: unanimous labels (the synthetic data's labels are the hidden
        reward's; the official code then uses odds α/ε). The code uses 0.75
        (``simulate_proportion``) for datasets without vote counts.
    :ivar eps: ε replacing 1 − α when α = 1 (``eps = 1e-3`` in ``calculate_upper_bound_rlhf.py``).
    :ivar alpha_key: a batch key with a per-pair α ``[B]`` (overrides ``alpha``); ``None``: none.
    :ivar length_normalized: also report R̃ and R̃* (length-normalized likelihoods).
    """

    beta: float | None = None
    alpha: float = 1.0
    eps: float = 1e-3
    alpha_key: str | None = None
    length_normalized: bool = True

    def __post_init__(self) -> None:
        b = self.beta
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b <= 0
        ):
            raise ValueError(
                f"RankingAccuracyConfig.beta must be a finite number > 0 (or null), got {b!r}"
            )
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0.5 < a <= 1:
            raise ValueError(
                f"RankingAccuracyConfig.alpha must be in (0.5, 1] (y_w is the majority's choice), got {a!r}"
            )
        e = self.eps
        if isinstance(e, bool) or not isinstance(e, int | float) or not 0 < e < 0.5:
            raise ValueError(f"RankingAccuracyConfig.eps must be in (0, 0.5), got {e!r}")
        if self.alpha_key is not None and (
            not isinstance(self.alpha_key, str) or not self.alpha_key
        ):
            raise ValueError(
                f"RankingAccuracyConfig.alpha_key must be a non-empty string or null, got {self.alpha_key!r}"
            )
        if not isinstance(self.length_normalized, bool):
            raise ValueError(
                f"RankingAccuracyConfig.length_normalized must be true or false, got {self.length_normalized!r}"
            )


class RankingAccuracy(Plugin):
    """Ranking accuracy R (Def. 2.3) and idealized ranking accuracy R* (Cor. 3.3) of Chen et al.

    Adds four validation metrics (two with ``length_normalized: false``), logged as
    ``val/ranking-accuracy/<kind>``: ``ranking`` (R, the policy's), ``idealized`` (R*, what
    the exact DPO/RLHF optimum with the run's reference and β would reach), ``ranking_ln``
    and ``idealized_ln`` (R̃, R̃*). R* needs reference log-probabilities: ``objective.reference``
    ``model`` or ``precomputed`` (with ``none``, log π_Ref = 0 and R* only reflects α).

    Every metric is a pair of integer counts summed across ranks, so N processes report the
    value over the whole validation set, exactly as 1 process does. No training-time effect.
    """

    Config = RankingAccuracyConfig
    name = NAME
    family: ClassVar[str] = "metric"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    paper: ClassVar[Paper] = Paper(
        title="Preference Learning Algorithms Do Not Learn Preference Rankings",
        authors=(
            "Angelica Chen",
            "Sadhika Malladi",
            "Lily H. Zhang",
            "Xinyi Chen",
            "Qiuyi Zhang",
            "Rajesh Ranganath",
            "Kyunghyun Cho",
        ),
        year=2024,
        venue="NeurIPS 2024",
        arxiv="2405.19534",
        bibtex=BIBTEX,
        code="https://github.com/angie-chen55/pref-learning-ranking-acc",
        checked_against=(
            "the paper (official repo @a86bdef, the PDF): Def. 2.3, Thm. 3.1, Cor. 3.3, Thm. 4.1; "
            "rlhf_minimizer_client.py (_compute_likelihood_ratios_helper: a1/eps when a2 = 0) and "
            "calculate_upper_bound_rlhf.py (eps = 1e-3)"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: RankingAccuracyConfig

    @hookimpl
    def metric_build(self, module: Any, ctx: StepContext) -> Mapping[str, torchmetrics.Metric]:
        """R and R* (and R̃, R̃*) as count metrics; β defaults to the module's ``objective.beta``."""
        from paperhooks_ranking_accuracy.pair_count import PairCountMetric

        cfg = self.config
        beta = cfg.beta
        if beta is None:
            objective = getattr(module, "objective", None)
            beta = getattr(objective, "beta", None)
            if beta is None:
                raise ValueError(
                    f"{NAME}: no beta: the module has no preference objective; set the plugin's beta "
                    "(the metric needs preference data: chosen/rejected log-probabilities)"
                )
        kinds = KINDS if cfg.length_normalized else KINDS[:2]
        return {
            f"{NAME}/{kind}": PairCountMetric(kind, float(beta), cfg.alpha, cfg.eps, cfg.alpha_key)
            for kind in kinds
        }


def __getattr__(name: str):  # noqa: ANN202
    """``PairCountMetric`` (now in :mod:`.pair_count`) loads on first use: it imports
    torchmetrics, which loading the plugin should not pay for."""
    if name == "PairCountMetric":
        from paperhooks_ranking_accuracy.pair_count import PairCountMetric

        return PairCountMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
