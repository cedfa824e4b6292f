"""Find plugins through ``importlib.metadata`` entry points (group ``paperhooks``).

Only what a recipe names is imported. A plugin that fails to import is reported with its
distribution and the error, and does not affect recipes that do not use it.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from typing import TYPE_CHECKING

from paperhooks._known import KNOWN_PLUGINS
from paperhooks.errors import PluginLoadError, UnknownPluginError, did_you_mean

if TYPE_CHECKING:
    from paperhooks.plugin import Plugin

GROUP = "paperhooks"


@dataclass(frozen=True)
class Found:
    """One entry point: a plugin name, its distribution and version."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: md.EntryPoint


def entry_points() -> dict[str, Found]:
    """Every installed plugin by name; two distributions claiming one name is an error."""
    found: dict[str, Found] = {}
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP:
                continue
            item = Found(ep.name, ep.value, dist.metadata["Name"], dist.version, ep)
            other = found.get(ep.name)
            if other is not None and other.distribution != item.distribution:
                raise PluginLoadError(
                    f"plugin name {ep.name!r} is claimed by two distributions: "
                    f"{other.distribution} {other.version} ({other.value}) and "
                    f"{item.distribution} {item.version} ({item.value}); uninstall one of them"
                )
            found[ep.name] = item
    return dict(sorted(found.items()))


def load(name: str, found: dict[str, Found] | None = None) -> type[Plugin]:
    """Import the plugin class registered as ``name``."""
    from paperhooks.plugin import FAMILIES, Plugin

    found = entry_points() if found is None else found
    if name not in found:
        hint = did_you_mean(name, found)
        msg = f"unknown plugin {name!r}{hint}"
        if name in KNOWN_PLUGINS:
            msg += f"; it is a paperhooks paper plugin: pip install paperhooks-{name}"
        msg += "; installed plugins: " + (", ".join(found) or "none")
        raise UnknownPluginError(msg)
    item = found[name]
    try:
        cls = item.entry_point.load()
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise PluginLoadError(
            f"plugin {name!r} from distribution {item.distribution} {item.version} failed to import: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginLoadError(
            f"plugin {name!r} from {item.distribution}: entry point {item.value} is not a paperhooks.Plugin subclass"
        )
    if cls.family not in FAMILIES:
        raise PluginLoadError(
            f"plugin {name!r} from {item.distribution}: family {cls.family!r} is not one of {', '.join(FAMILIES)}"
        )
    return cls


@dataclass(frozen=True)
class Listed:
    name: str
    distribution: str
    version: str
    family: str
    paper: str
    error: str


def list_plugins() -> list[Listed]:
    """Every installed plugin with its family and paper, or the error that stopped its import."""
    found = entry_points()
    rows = []
    for name, item in found.items():
        try:
            cls = load(name, found)
        except PluginLoadError as e:
            rows.append(Listed(name, item.distribution, item.version, "", "", str(e)))
            continue
        paper = ""
        if cls.paper:
            venue = (
                cls.paper.venue
                if str(cls.paper.year) in cls.paper.venue
                else f"{cls.paper.venue} {cls.paper.year}"
            )
            paper = f"{cls.paper.title} ({venue})"
        rows.append(Listed(name, item.distribution, item.version, cls.family, paper, ""))
    return rows
