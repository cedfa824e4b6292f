"""The plugin's config: a frozen dataclass with the official script's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


def _number(owner: str, name: str, value: object, ok: bool, allowed: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok
    ):
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class ParetoDAConfig:
    """Hyper-parameters; defaults are the official script's (``examples/DANN+ParetoDA.py``).

    :ivar weighting: ``pareto`` (the LP) or ``linear``: fixed weights π, the linear
        scalarization ParetoDA is compared against (same objectives, no LP).
    :ivar eps: ε: the LP balances (towards the held-out gradient) while ``L_v > ε``, else it
        maximizes descent (official ``EPO_LP(m=3, eps=1e-3)``).
    :ivar preference: π, one value per training objective (source, transfer, TCM, ...);
        empty = all 1 (official ``--pref1/2/3`` = 1). The LP's fallback, the point its ties
        are broken towards, and the weights of ``linear``.
    :ivar refine: ``logits`` (official ``rho_pred``: softmax(y ⊙ D)) or ``bayes``
        (softmax(y) ⊙ D, renormalized).
    :ivar grl_max_steps: N of the gradient-reversal warm-up λ = 2/(1 + e^{−i/N}) − 1 at step i
        (dalib ``max_iters=1000`` counts forward calls, two per official step: 500 steps).
    :ivar grl_hi: the final λ (dalib ``hi=1``).
    :ivar discriminator_hidden: width of the discriminators' two hidden layers (official 1024).
    :ivar features: attribute of the model holding the shared feature extractor.
    :ivar head: attribute of the model holding the classifier (an ``nn.Linear``, or any module
        with ``in_features``/``out_features``).
    """

    weighting: Literal["pareto", "linear"] = "pareto"
    eps: float = 1e-3
    preference: tuple[float, ...] = ()
    refine: Literal["logits", "bayes"] = "logits"
    grl_max_steps: int = 500
    grl_hi: float = 1.0
    discriminator_hidden: int = 1024
    features: str = "features"
    head: str = "head"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.weighting not in ("pareto", "linear"):
            raise ValueError(
                f"{owner}.weighting must be one of ['pareto', 'linear'], got {self.weighting!r}"
            )
        if self.refine not in ("logits", "bayes"):
            raise ValueError(
                f"{owner}.refine must be one of ['logits', 'bayes'], got {self.refine!r}"
            )
        _number(owner, "eps", self.eps, True, "a finite number")
        _number(owner, "grl_hi", self.grl_hi, self.grl_hi >= 0, "a finite number >= 0")
        for name in ("grl_max_steps", "discriminator_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}.{name} must be an integer >= 1, got {v!r}")
        pref = self.preference
        if (
            not isinstance(pref, tuple)
            or not all(
                isinstance(p, int | float)
                and not isinstance(p, bool)
                and math.isfinite(p)
                and p >= 0
                for p in pref
            )
            or (pref and sum(pref) <= 0)
        ):
            raise ValueError(
                f"{owner}.preference must be a tuple of finite numbers >= 0, not all 0, got {pref!r}"
            )
        for name in ("features", "head"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).isidentifier():
                raise ValueError(
                    f"{owner}.{name} must be an attribute name, got {getattr(self, name)!r}"
                )


__all__ = ["ParetoDAConfig"]
