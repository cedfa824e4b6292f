"""What a plugin declares: its entry point, metadata, config, and the recipes that name it.

Checks raise :class:`~paperhooks.testing.families.ConformanceError` naming the plugin;
:func:`check_metadata` reports every problem at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from paperhooks.errors import PaperhooksError
from paperhooks.plugin import FAMILIES, STRATEGIES, Paper, Plugin
from paperhooks.testing.families import ConformanceError, fail

ARXIV_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z-]+(\.[A-Z]{2})?/\d{7})(v\d+)?$")
BIBTEX_RE = re.compile(r"^\s*@\w+\s*\{\s*[^,\s{}]+\s*,")
SUPPORT = ("tested", "untested", "unsupported")


# -- discovery ---------------------------------------------------------------------------------------
def discovered() -> list[str]:
    """Names of every installed plugin (entry points of group ``paperhooks``)."""
    from paperhooks import discovery

    return sorted(discovery.entry_points())


def check_entry_point(name: str) -> type[Plugin]:
    """The plugin class registered as ``name``, loaded as a recipe would load it."""
    from paperhooks import discovery

    found = discovery.entry_points()
    if name not in found:
        fail(
            name, f"no entry point in group 'paperhooks' (installed: {', '.join(found) or 'none'})"
        )
    try:
        return discovery.load(name, found)
    except PaperhooksError as e:
        raise ConformanceError(str(e)) from e


def make_plugin(name: str, plugin_config: Mapping[str, Any] | None = None) -> Plugin:
    """An instance of the plugin ``name`` with a config built from recipe values, as the core builds it."""
    from paperhooks import schema

    cls = check_entry_point(name)
    try:
        config = schema.build(cls.Config, dict(plugin_config or {}), f"plugins[0] ({name})")
    except (PaperhooksError, TypeError) as e:
        raise ConformanceError(
            f"plugin {name!r}: plugin_config {dict(plugin_config or {})} is invalid: {e}"
        ) from e
    plugin = cls(config)
    plugin.name = name
    return plugin


# -- metadata ---------------------------------------------------------------------------------------
def check_metadata(cls: type, name: str | None = None) -> None:
    """Everything a plugin declares besides its hooks' behaviour, all problems at once.

    Paper: title, authors, year, venue and BibTeX present; arXiv id well-formed or ``None``;
    code an http(s) URL or ``"none found"``. Family one of :data:`~paperhooks.plugin.FAMILIES`
    and at least one of its hooks implemented. Strategies: every kind of
    :data:`~paperhooks.plugin.STRATEGIES` declared, ``single`` tested. Config: a frozen
    dataclass whose fields all have defaults that survive a recipe round-trip. ``name``
    (when the class sets it) equal to the entry-point name.
    """
    who = name or getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        fail(who, f"{cls!r} is not a paperhooks.Plugin subclass")
    problems = [
        *_paper_problems(cls.paper),
        *_strategy_problems(cls.strategies),
        *_config_problems(cls),
    ]
    if cls.family not in FAMILIES:
        problems.append(f"family {cls.family!r} is not one of {', '.join(FAMILIES)}")
    else:
        problems += _hook_problems(cls)
    if name is not None and cls.name and cls.name != name:
        problems.append(
            f"class attribute name = {cls.name!r} differs from its entry-point name {name!r}"
        )
    if problems:
        fail(who, "metadata problems:\n  - " + "\n  - ".join(problems))


def _paper_problems(paper: Any) -> list[str]:
    if not isinstance(paper, Paper):
        return [f"paper must be a paperhooks.Paper, got {type(paper).__name__}"]
    out = [f"paper.{f} is empty" for f in paper.missing()]
    if not (
        isinstance(paper.authors, tuple)
        and all(isinstance(a, str) and a.strip() for a in paper.authors)
    ):
        out.append(f"paper.authors must be a tuple of names, got {paper.authors!r}")
    year = paper.year
    if (
        isinstance(year, bool)
        or not isinstance(year, int)
        or not 1900 <= year <= datetime.date.today().year + 1
    ):
        out.append(f"paper.year must be a year, got {year!r}")
    if paper.arxiv is not None and not ARXIV_RE.match(str(paper.arxiv)):
        out.append(f"paper.arxiv must be an arXiv id like 2502.06733 or None, got {paper.arxiv!r}")
    if paper.bibtex and not _bibtex_ok(paper.bibtex):
        out.append(
            "paper.bibtex is not one BibTeX entry (@type{key, title = {...}, ...}) with balanced braces"
        )
    if paper.code and paper.code != "none found" and not re.match(r"^https?://\S+$", paper.code):
        out.append(f"paper.code must be an http(s) URL or 'none found', got {paper.code!r}")
    return out


def _bibtex_ok(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return (
        depth == 0
        and bool(BIBTEX_RE.match(text))
        and re.search(r"\btitle\s*=", text, re.I) is not None
    )


def _strategy_problems(strategies: Mapping[str, str]) -> list[str]:
    out = []
    missing = [k for k in STRATEGIES if k not in strategies]
    if missing:
        out.append(
            f"strategies must declare every kind of {', '.join(STRATEGIES)}; missing {', '.join(missing)}"
        )
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        out.append(f"strategies declares unknown kinds {unknown}")
    bad = {k: v for k, v in strategies.items() if v not in SUPPORT}
    if bad:
        out.append(f"strategies values must be one of {', '.join(SUPPORT)}; got {bad}")
    if strategies.get("single") != "tested":
        out.append("strategies['single'] must be 'tested'")
    return out


def _config_problems(cls: type[Plugin]) -> list[str]:
    from paperhooks import schema

    config_cls = cls.Config
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        return [f"Config must be a dataclass, got {config_cls!r}"]
    out = []
    if not config_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        out.append(
            f"Config {config_cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))"
        )
    no_default = [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if no_default:
        return [
            *out,
            f"Config fields without a default: {', '.join(no_default)} (defaults are the paper's)",
        ]
    try:
        default = config_cls()
    except Exception as e:  # noqa: BLE001 - a config whose defaults fail its own validation
        return [*out, f"Config() with the defaults raises {type(e).__name__}: {e}"]
    callables = [k for k, v in schema.to_plain(default).items() if callable(v)]
    if callables:
        out.append(
            f"Config fields hold callables: {', '.join(callables)} (recipes hold plain data)"
        )
    try:
        again = schema.build(config_cls, schema.to_plain(default), "Config")
    except (PaperhooksError, TypeError) as e:
        return [*out, f"the default Config does not survive a recipe round-trip: {e}"]
    if again != default:
        out.append(
            f"the default Config changes through a recipe round-trip: {default!r} -> {again!r}"
        )
    return out


def _hook_problems(cls: type[Plugin]) -> list[str]:
    from paperhooks.manager import PluginSet

    try:
        plugin = cls()
        plugin.name = plugin.name or cls.__name__
        order = PluginSet([plugin]).order()
    except Exception as e:  # noqa: BLE001 - reported as a problem of the plugin
        return [f"cannot be registered with its default config: {type(e).__name__}: {e}"]
    prefix = FAMILIES[cls.family]
    if not any(hook.startswith(prefix) for hook in order):
        return [f"implements no hook of its family {cls.family!r} (hooks starting with {prefix!r})"]
    return []


# -- recipes ---------------------------------------------------------------------------------------------
def tiny_recipe(
    plugins: Sequence[Mapping[str, Any]],
    *,
    run_dir: Path | str = "runs",
    name: str = "conformance",
    trainer: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    dropout: float = 0.1,
    task: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The kit's recipe: an MLP with dropout on digits, SGD with momentum and a cosine schedule.

    The 1437 training digits make 11 full batches of 128 an epoch. Dropout makes the RNG
    state matter on resume; multi-process runs turn it off (each rank draws its own masks).

    ``task`` replaces the ``model``, ``data``, ``optimizer`` (and ``objective``) sections for
    plugins that need their own task, e.g. :data:`PREFERENCE_TASK`; ``batch_size`` still sets
    ``data.batch_size`` and ``dropout`` applies to the MLP only.
    """
    raw: dict[str, Any] = {
        "seed": 5,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "mlp", "hidden": [16], "dropout": dropout},
        "data": {"name": "digits", "batch_size": batch_size},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "scheduler": "cosine"},
        "trainer": {"enable_progress_bar": False, "max_steps": 6, **(trainer or {})},
        "plugins": [dict(p) for p in plugins],
    }
    for key, section in (task or {}).items():
        if key not in ("model", "data", "optimizer", "objective"):
            raise ValueError(f"task may replace model, data, optimizer and objective, not {key!r}")
        raw[key] = dict(section)
    raw["data"]["batch_size"] = batch_size
    return raw


#: A preference task for :func:`tiny_recipe`'s ``task``: a 1-layer GPT-2 (width 32) on 1024
#: synthetic preference pairs (8 batches of 128 an epoch), DPO with a frozen reference model.
PREFERENCE_TASK: dict[str, Any] = {
    "model": {"name": "causal-lm", "layers": 1, "width": 32},
    "data": {"name": "synthetic-preferences", "n_train": 1024, "n_val": 128},
    "optimizer": {"name": "adam", "lr": 0.003, "scheduler": "cosine"},
    "objective": {"beta": 0.1, "reference": "model"},
}


def check_recipe_roundtrip(
    name: str,
    config_overrides: Mapping[str, Any] | None = None,
    *,
    task: Mapping[str, Any] | None = None,
) -> Any:
    """A recipe naming the plugin with ``config_overrides`` validates; its resolved config,
    written as YAML and read back, validates to an equal config. Returns the config.

    :param task: the recipe's task (see :func:`tiny_recipe`); by default the kit's MLP on
        digits, or :data:`PREFERENCE_TASK` / regression data for a plugin whose ``tasks``
        exclude classification (recipe validation refuses it on digits).
    """
    from omegaconf import OmegaConf

    from paperhooks import discovery, schema
    from paperhooks import recipe as R
    from paperhooks.errors import ConfigKeyError

    overrides = dict(config_overrides or {})
    if task is None:
        task = _task_for(discovery.load(name).tasks)

    try:
        (entry,) = R.validate(tiny_recipe([{"name": name, **overrides}], task=task)).plugins
    except (PaperhooksError, TypeError) as e:  # TypeError: a config field type recipes cannot hold
        raise ConformanceError(
            f"plugin {name!r}: a recipe with {overrides} does not validate: {e}"
        ) from e
    config = entry.config
    if not isinstance(config, entry.cls.Config):
        fail(
            name,
            f"the recipe built a {type(config).__name__}, not its Config {entry.cls.Config.__name__}",
        )
    plain = schema.to_plain(config)
    for key, value in overrides.items():
        if plain.get(key) != _plain(value):
            fail(name, f"{key} = {value!r} in the recipe resolved to {plain.get(key)!r}")
    text = OmegaConf.to_yaml(OmegaConf.create({"plugins": [{"name": name, **plain}]}))
    reread = OmegaConf.to_container(OmegaConf.create(text))["plugins"]  # type: ignore[index]
    try:
        (again,) = R.validate(tiny_recipe(reread, task=task)).plugins
    except (PaperhooksError, TypeError) as e:
        raise ConformanceError(
            f"plugin {name!r}: its resolved config {plain} does not validate again: {e}"
        ) from e
    if again.config != config:
        fail(name, f"the config changed through YAML: {config!r} -> {again.config!r}")
    with contextlib.suppress(ConfigKeyError):
        R.validate(tiny_recipe([{"name": name, **plain, "no_such_key": 1}], task=task))
        fail(name, "a recipe with an unknown config key 'no_such_key' was accepted")
    return config


def _task_for(tasks: Sequence[str]) -> Mapping[str, Any] | None:
    """A kit task of a kind the plugin works on: ``None`` (digits) when it takes classification."""
    if not tasks or "classification" in tasks:
        return None
    if "preference" in tasks:
        return PREFERENCE_TASK
    return {"data": {"name": "regression"}}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "check_entry_point",
    "check_metadata",
    "check_recipe_roundtrip",
    "discovered",
    "make_plugin",
    "tiny_recipe",
]
