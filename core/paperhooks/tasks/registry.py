"""Registered models and datasets: recipes name them, never import dotted paths.

A recipe's ``model.name`` and ``data.name`` pick an entry of :data:`MODELS` and
:data:`DATASETS`; the rest of the section configures it through the entry's frozen config
dataclass. Config fields use only ``int``, ``float``, ``str``, ``bool``, ``Literal[...]``,
``tuple[int, ...]``, ``X | None`` and nested frozen dataclasses, so one generic validator can
check any of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

if TYPE_CHECKING:
    from paperhooks.tasks.data import PaperhooksDataModule


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data before it is built."""

    task: Literal["classification", "regression", "preference"]
    num_classes: int
    input_shape: tuple[int, ...]
    #: task-specific sizes: for ``preference`` data ``vocab_size`` and ``max_length`` (causal
    #: LM) or ``prompts`` and ``responses`` (tabular policy)
    sizes: tuple[tuple[str, int], ...] = dataclasses.field(default=(), kw_only=True)
    #: classification trained on a subset of the classes (empty: all); the task module then
    #: reports validation accuracy on these classes and on the others apart
    train_classes: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)

    def size(self, key: str) -> int:
        """One of :attr:`sizes` by name (raises naming the available ones)."""
        found = dict(self.sizes)
        if key not in found:
            raise ValueError(
                f"the data gives no {key!r} (it gives: {', '.join(found) or 'nothing'})"
            )
        return found[key]


@dataclass(frozen=True)
class Registered:
    """One registered model or dataset: its config class, builder and one-line doc.

    ``task`` (datasets): the kind of data it builds (``DataInfo.task``), when the registration
    declares it; recipe validation then refuses plugins that do not work on it before anything
    is built.
    """

    name: str
    config_cls: type
    builder: Callable[..., Any]
    doc: str
    task: str | None = None


MODELS: dict[str, Registered] = {}
DATASETS: dict[str, Registered] = {}

_BUILTIN_MODULES = (
    "paperhooks.tasks.models",
    "paperhooks.tasks.data",
    "paperhooks.tasks.preference",
)
_F = TypeVar("_F", bound=Callable[..., Any])


TASK_KINDS = ("classification", "regression", "preference")


def _register(
    table: dict[str, Registered], kind: str, name: str, config_cls: type, task: str | None = None
) -> Callable[[_F], _F]:
    if task is not None and task not in TASK_KINDS:
        raise ValueError(
            f"{kind} {name!r}: task must be one of {', '.join(TASK_KINDS)}, got {task!r}"
        )
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(
            f"{kind} {name!r}: config class {config_cls.__name__} must be a frozen dataclass"
        )

    def deco(builder: _F) -> _F:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        doc = (builder.__doc__ or "").strip().splitlines()
        table[name] = Registered(name, config_cls, builder, doc[0] if doc else "", task)
        return builder

    return deco


def register_model(name: str, config_cls: type) -> Callable[[_F], _F]:
    """Decorator: register ``builder(config, info) -> nn.Module`` under ``name``."""
    return _register(MODELS, "model", name, config_cls)


def register_dataset(name: str, config_cls: type, task: str | None = None) -> Callable[[_F], _F]:
    """Decorator: register ``builder(config, seed) -> PaperhooksDataModule`` under ``name``.

    :param task: the ``DataInfo.task`` every build of it has (``classification``,
        ``regression`` or ``preference``). Declared, it lets ``paperhooks validate`` refuse
        plugins that do not work on this data (``Plugin.tasks``); the build is checked against it.
    """
    return _register(DATASETS, "dataset", name, config_cls, task)


def check_field(ok: bool, name: str, allowed: str, value: object) -> None:
    """Raise ``ValueError("<name> must be <allowed>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


#: entry-point group of plugin distributions that register models or datasets: each entry
#: names a module whose import registers them (``[project.entry-points."paperhooks.tasks"]
#: my-method = "paperhooks_my_method.tasks"``)
TASKS_GROUP = "paperhooks.tasks"
#: plugin task modules that failed to import: entry-point name → "distribution: error"
TASK_ERRORS: dict[str, str] = {}
_plugin_tasks_loaded = False


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def load_tasks() -> None:
    """Register the built-in tasks and every installed plugin's tasks (group ``paperhooks.tasks``).

    Plugin task modules are imported once, on the first lookup (they usually import
    Lightning), so listing plugins stays cheap and a recipe can use a plugin's dataset or model
    without naming the plugin. A module that fails to import is recorded in
    :data:`TASK_ERRORS` (and named in unknown-name errors); the other tasks still register.
    """
    global _plugin_tasks_loaded
    _load_builtins()
    if _plugin_tasks_loaded:
        return
    _plugin_tasks_loaded = True
    from importlib import metadata

    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != TASKS_GROUP:
                continue
            try:
                ep.load()
            except Exception as e:  # a broken plugin must not break the other tasks
                TASK_ERRORS[ep.name] = f"{dist.metadata['Name']}: {type(e).__name__}: {e}"


def task_errors_hint() -> str:
    """``"; tasks that failed to load: ..."`` for unknown-name errors, or ``""``."""
    if not TASK_ERRORS:
        return ""
    return "; tasks that failed to load: " + "; ".join(
        f"{k} ({v})" for k, v in sorted(TASK_ERRORS.items())
    )


def _lookup(table: dict[str, Registered], kind: str, name: str) -> Registered:
    load_tasks()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown {kind} {name!r}{hint} (registered: {', '.join(sorted(table))}){task_errors_hint()}"
        )
    return table[name]


def config_from_mapping(config_cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build ``config_cls`` from a plain mapping with the recipe validator (errors name the key)."""
    from paperhooks.schema import build

    return build(config_cls, values, prefix.rstrip(".") or config_cls.__name__)


def _coerce(entry: Registered, config: Any) -> Any:
    if config is None:
        return entry.config_cls()
    if isinstance(config, entry.config_cls):
        return config
    if isinstance(config, Mapping):
        return config_from_mapping(entry.config_cls, config)
    raise TypeError(
        f"{entry.name!r} expects a {entry.config_cls.__name__}, a mapping or None; got {type(config).__name__}"
    )


def build_model(name: str, config: Any, info: DataInfo) -> torch.nn.Module:
    """Build registered model ``name`` from ``config`` (its config class, a mapping or None)."""
    entry = _lookup(MODELS, "model", name)
    return entry.builder(_coerce(entry, config), info)


def build_datamodule(name: str, config: Any, seed: int) -> PaperhooksDataModule:
    """Build registered dataset ``name``; its ``info`` is available before any trainer exists."""
    entry = _lookup(DATASETS, "dataset", name)
    dm = entry.builder(_coerce(entry, config), seed)
    if entry.task is not None and dm.info.task != entry.task:
        raise ValueError(
            f"dataset {name!r} is registered as {entry.task} data but built {dm.info.task} data"
        )
    return dm


__all__ = [
    "DATASETS",
    "MODELS",
    "DataInfo",
    "Registered",
    "TASK_KINDS",
    "build_datamodule",
    "build_model",
    "check_field",
    "config_from_mapping",
    "load_tasks",
    "register_dataset",
    "register_model",
]
