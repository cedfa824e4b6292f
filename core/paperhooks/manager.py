"""The plugin manager: registers plugins in recipe order and resolves the call order once.

pluggy calls the last-registered implementation first. paperhooks does not rely on that:
at set-up it reads each hook's implementations (``get_hookimpls``, registration = recipe
order) into plain lists, so the training step only loops over bound methods, in recipe
order (``lifecycle_fit_end`` in reverse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pluggy

from paperhooks.errors import IncompatiblePluginsError, PluginLoadError, RecipeError
from paperhooks.hookspecs import SPEC_MODULES
from paperhooks.plugin import FAMILIES, PROJECT, Plugin

#: hooks with exactly one owner: a second implementation is refused
ONE_OWNER = (
    "objweight_coefficients",
    "optimizer_build",
    "pruning_schedule",
    "pruning_scores",
    "pruning_allocate",
)
REVERSED = ("lifecycle_fit_end",)


def spec_names() -> list[str]:
    """Every hook name the core specifies."""
    names = []
    for mod in SPEC_MODULES:
        names += [n for n in dir(mod) if hasattr(getattr(mod, n), f"{PROJECT}_spec")]
    return sorted(names)


def _hook_names(cls: type) -> list[str]:
    return [n for n in dir(cls) if hasattr(getattr(cls, n, None), f"{PROJECT}_impl")]


def check_combination(plugins: Sequence[tuple[str, type]]) -> None:
    """Refuse plugins that declare each other incompatible or both own a one-owner hook."""
    names = [n for n, _ in plugins]
    for name, cls in plugins:
        for other, why in cls.incompatible_with.items():
            if other in names and other != name:
                raise IncompatiblePluginsError(
                    f"plugins {name!r} and {other!r} cannot be combined: {why}"
                )
    for hook in ONE_OWNER:
        owners = [n for n, cls in plugins if hook in _hook_names(cls)]
        if len(owners) > 1:
            raise IncompatiblePluginsError(
                f"plugins {owners[0]!r} and {owners[1]!r} both implement {hook}, which has one owner; keep one of them"
            )
    replacing = [n for n, cls in plugins if cls.replaces_task_loss]
    if len(replacing) > 1:
        raise IncompatiblePluginsError(
            f"plugins {replacing[0]!r} and {replacing[1]!r} both replace the task loss; keep one of them"
        )


class Impl:
    """One plugin's implementation of a hook, called with keyword arguments.

    The core passes every argument of the spec; an implementation may name only some of
    them (as pluggy allows), and receives just those.
    """

    __slots__ = ("plugin", "function", "argnames")

    def __init__(
        self, plugin: Plugin, function: Callable[..., Any], argnames: tuple[str, ...]
    ) -> None:
        self.plugin, self.function, self.argnames = plugin, function, argnames

    def __call__(self, **kwargs: Any) -> Any:
        if len(kwargs) == len(self.argnames):
            return self.function(**kwargs)
        return self.function(**{k: kwargs[k] for k in self.argnames})


class PluginSet:
    """Active plugins of one run, in recipe order, with the call lists of every hook."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = list(plugins)
        check_combination([(p.name or type(p).__name__, type(p)) for p in self.plugins])
        pm = pluggy.PluginManager(PROJECT)
        for mod in SPEC_MODULES:
            pm.add_hookspecs(mod)
        for i, p in enumerate(self.plugins):
            self._check_family(p)
            try:
                pm.register(p, name=f"{i}:{p.name or type(p).__name__}")
            except pluggy.PluginValidationError as e:
                raise PluginLoadError(f"plugin {p.name!r}: {e}") from None
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginLoadError(
                f"a plugin implements a hook paperhooks does not specify: {e}"
            ) from None
        self._pm = pm
        self.calls: dict[str, list[Impl]] = {}
        for name in spec_names():
            impls = [
                Impl(impl.plugin, impl.function, impl.argnames)
                for impl in getattr(pm.hook, name).get_hookimpls()
            ]
            self.calls[name] = impls[::-1] if name in REVERSED else impls
        self.replaces_task_loss = any(p.replaces_task_loss for p in self.plugins)

    @staticmethod
    def _check_family(p: Plugin) -> None:
        families = (p.family, *p.extra_families)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise PluginLoadError(
                f"plugin {p.name!r}: family {unknown[0]!r} is not one of {', '.join(FAMILIES)}"
            )
        prefixes = (*(FAMILIES[f] for f in families), "lifecycle_")
        for hook in _hook_names(type(p)):
            if not hook.startswith(prefixes):
                raise PluginLoadError(
                    f"plugin {p.name!r} of family {' + '.join(families)} implements {hook}; "
                    f"its hooks must start with one of {', '.join(map(repr, prefixes))}"
                )

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.plugins)

    def __len__(self) -> int:
        return len(self.plugins)

    def has(self, hook: str) -> bool:
        return bool(self.calls[hook])

    def owner(self, hook: str) -> Callable[..., Any] | None:
        """The single implementation of a one-owner hook, or None."""
        impls = self.calls[hook]
        return impls[0] if impls else None

    def order(self) -> dict[str, list[str]]:
        """Hook name → plugin names in call order, for ``paperhooks explain``."""
        out = {}
        for hook, impls in self.calls.items():
            if impls:
                out[hook] = [f.plugin.name for f in impls]
        return out

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "state": p.state_dict()} for p in self.plugins]

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        names = [p.name for p in self.plugins]
        saved = [s["name"] for s in states]
        if names != saved:
            raise RecipeError(
                f"checkpoint holds plugins {saved}, but the recipe has {names}; they must match to resume"
            )
        for p, s in zip(self.plugins, states, strict=True):
            p.load_state_dict(s["state"])
