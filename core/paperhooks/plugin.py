"""What every plugin is: a class with a frozen config, paper metadata, strategy support and state.

A plugin distribution exposes one class through the entry-point group ``paperhooks``::

    [project.entry-points.paperhooks]
    loss-reweighting = "paperhooks_loss_reweighting:LossReweighting"

The class subclasses :class:`Plugin`, sets :attr:`Plugin.Config` (a frozen dataclass whose
defaults are the paper's), :attr:`Plugin.paper` and :attr:`Plugin.family`, and implements the
hooks of its family with :data:`paperhooks.hookimpl`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pluggy

PROJECT = "paperhooks"

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marker for a plugin's hook implementations (``@hookimpl``)."""

FAMILIES: dict[str, str] = {
    # family name -> prefix of its hook names
    "sample-weighting": "weighting_",
    "objective": "objective_",
    "objective-weighting": "objweight_",
    "gradient-surgery": "surgery_",
    "reparameterization": "reparam_",
    "pruning": "pruning_",
    "optimizer": "optimizer_",
    "metric": "metric_",
    "input-perturbation": "perturb_",
    "post-training": "transform_",
}
"""The hook families; a plugin implements the hooks of its family plus ``lifecycle_*`` hooks."""

STRATEGIES = ("single", "ddp", "fsdp2", "fsdp", "deepspeed")
"""Strategy kinds a plugin declares support for (see :attr:`Plugin.strategies`)."""

Support = Literal["tested", "untested", "unsupported"]


@dataclass(frozen=True)
class Paper:
    """Provenance of the method a plugin implements."""

    title: str
    authors: tuple[str, ...]
    year: int
    venue: str
    arxiv: str | None
    bibtex: str
    code: str  # official code URL, or "none found"
    checked_against: str = ""  # which file/library the formulas and defaults were checked against
    verified: bool = True  # False while the equations are a reconstruction, not the paper's own

    def missing(self) -> list[str]:
        """Names of required fields that are empty."""
        required = ("title", "authors", "year", "venue", "bibtex", "code")
        return [f for f in required if not getattr(self, f)]


@dataclass(frozen=True)
class NoConfig:
    """Config of a plugin without hyper-parameters."""


class Plugin:
    """Base class of every paperhooks plugin.

    Subclasses set the class attributes below and implement hooks with ``@hookimpl``.
    Instances are created by the core from a recipe entry, one per entry, in recipe order.
    """

    Config: ClassVar[type] = NoConfig
    family: ClassVar[str] = ""
    #: further families whose hooks this plugin implements (rare: e.g. a weighting method that
    #: also adds a loss term); ``family`` stays the one it is listed under
    extra_families: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[Paper | None] = None
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "untested",
        "fsdp2": "untested",
        "fsdp": "untested",
        "deepspeed": "unsupported",
    }
    #: other plugin names this one cannot be combined with, and why
    incompatible_with: ClassVar[Mapping[str, str]] = {}
    #: the data kinds (``DataInfo.task``: ``classification``, ``regression``, ``preference``)
    #: the plugin works on; empty: any. The core refuses other data before training.
    tasks: ClassVar[tuple[str, ...]] = ()
    #: True when the plugin provides the training loss itself (the module's own losses are skipped)
    replaces_task_loss: ClassVar[bool] = False
    #: gradient surgery: True when ``surgery_combine`` uses only inner products, linear
    #: combinations and element-wise operations of the GradientSet (no ``view``, no gradient
    #: vectors kept in state), so it also works on a column slice under DDP
    columns_ok: ClassVar[bool] = False

    #: entry-point name, set by the core when the plugin is loaded
    name: str = ""

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the plugin learned or counted; saved in the Lightning checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The init fields of a config dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


__all__ = [
    "FAMILIES",
    "STRATEGIES",
    "NoConfig",
    "Paper",
    "Plugin",
    "Support",
    "config_fields",
    "field",
    "hookimpl",
]
