"""The conformance kit: the checks every paperhooks plugin's tests run.

A plugin's tests inherit them (new checks added here reach every plugin)::

    from paperhooks.testing.conformance import PluginConformance

    class TestConformance(PluginConformance):
        name = "loss-reweighting"
        plugin_config = {"burnin_steps": 1}  # so that it acts within a few steps

or call the checks one by one. Each raises :class:`ConformanceError` (an ``AssertionError``)
naming the plugin and what failed:

- :func:`check_entry_point`: the name loads through ``paperhooks.discovery``;
- :func:`check_metadata`: paper, family, strategies, frozen config with defaults, hooks;
- :func:`check_recipe_roundtrip`: a recipe with the plugin validates, its config
  survives YAML and validates again to an equal config;
- :func:`check_family`: the property checks of the plugin's family
  (:mod:`paperhooks.testing.families`);
- :func:`check_few_steps`: one epoch of the kit's tiny recipe, in-process, stays finite;
- :func:`check_resume`: resuming from a mid-run step checkpoint ends bit-identical;
- :func:`check_ddp_equals_single`: 2 processes (through the command line) end where 1
  process ends on the global batch.

The runs train :func:`tiny_recipe`: an MLP on scikit-learn's digits (no download), on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from paperhooks.errors import PaperhooksError
from paperhooks.plugin import FAMILIES, STRATEGIES, Paper, Plugin
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.families import FAMILY_CHECKS, ConformanceError, label

ARXIV_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z-]+(\.[A-Z]{2})?/\d{7})(v\d+)?$")
BIBTEX_RE = re.compile(r"^\s*@\w+\s*\{\s*[^,\s{}]+\s*,")
SUPPORT = ("tested", "untested", "unsupported")


def _fail(name: str, message: str) -> None:
    raise ConformanceError(f"plugin {name!r}: {message}")


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
        _fail(name, f"no entry point in group 'paperhooks' (installed: {', '.join(found) or 'none'})")
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
    except PaperhooksError as e:
        raise ConformanceError(f"plugin {name!r}: plugin_config {dict(plugin_config or {})} is invalid: {e}") from e
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
        _fail(who, f"{cls!r} is not a paperhooks.Plugin subclass")
    problems = [*_paper_problems(cls.paper), *_strategy_problems(cls.strategies), *_config_problems(cls)]
    if cls.family not in FAMILIES:
        problems.append(f"family {cls.family!r} is not one of {', '.join(FAMILIES)}")
    else:
        problems += _hook_problems(cls)
    if name is not None and cls.name and cls.name != name:
        problems.append(f"class attribute name = {cls.name!r} differs from its entry-point name {name!r}")
    if problems:
        _fail(who, "metadata problems:\n  - " + "\n  - ".join(problems))


def _paper_problems(paper: Any) -> list[str]:
    if not isinstance(paper, Paper):
        return [f"paper must be a paperhooks.Paper, got {type(paper).__name__}"]
    out = [f"paper.{f} is empty" for f in paper.missing()]
    if not (isinstance(paper.authors, tuple) and all(isinstance(a, str) and a.strip() for a in paper.authors)):
        out.append(f"paper.authors must be a tuple of names, got {paper.authors!r}")
    year = paper.year
    if isinstance(year, bool) or not isinstance(year, int) or not 1900 <= year <= datetime.date.today().year + 1:
        out.append(f"paper.year must be a year, got {year!r}")
    if paper.arxiv is not None and not ARXIV_RE.match(str(paper.arxiv)):
        out.append(f"paper.arxiv must be an arXiv id like 2502.06733 or None, got {paper.arxiv!r}")
    if paper.bibtex and not _bibtex_ok(paper.bibtex):
        out.append("paper.bibtex is not one BibTeX entry (@type{key, title = {...}, ...}) with balanced braces")
    if paper.code and paper.code != "none found" and not re.match(r"^https?://\S+$", paper.code):
        out.append(f"paper.code must be an http(s) URL or 'none found', got {paper.code!r}")
    return out


def _bibtex_ok(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0 and bool(BIBTEX_RE.match(text)) and re.search(r"\btitle\s*=", text, re.I) is not None


def _strategy_problems(strategies: Mapping[str, str]) -> list[str]:
    out = []
    missing = [k for k in STRATEGIES if k not in strategies]
    if missing:
        out.append(f"strategies must declare every kind of {', '.join(STRATEGIES)}; missing {', '.join(missing)}")
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
        out.append(f"Config {config_cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
    no_default = [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if no_default:
        return [*out, f"Config fields without a default: {', '.join(no_default)} (defaults are the paper's)"]
    try:
        default = config_cls()
    except Exception as e:  # noqa: BLE001 - a config whose defaults fail its own validation
        return [*out, f"Config() with the defaults raises {type(e).__name__}: {e}"]
    callables = [k for k, v in schema.to_plain(default).items() if callable(v)]
    if callables:
        out.append(f"Config fields hold callables: {', '.join(callables)} (recipes hold plain data)")
    try:
        again = schema.build(config_cls, schema.to_plain(default), "Config")
    except (PaperhooksError, TypeError) as e:
        return [*out, f"the default Config does not survive a recipe round-trip: {e}"]
    if again != default:
        out.append(f"the default Config changes through a recipe round-trip: {default!r} -> {again!r}")
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
) -> dict[str, Any]:
    """The kit's recipe: an MLP with dropout on digits, SGD with momentum and a cosine schedule.

    The 1437 training digits make 11 full batches of 128 an epoch.
    """
    return {
        "seed": 5,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "mlp", "hidden": [16], "dropout": 0.1},
        "data": {"name": "digits", "batch_size": batch_size},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "scheduler": "cosine"},
        "trainer": {"enable_progress_bar": False, "max_steps": 6, **(trainer or {})},
        "plugins": [dict(p) for p in plugins],
    }


def check_recipe_roundtrip(name: str, config_overrides: Mapping[str, Any] | None = None) -> Any:
    """A recipe naming the plugin with ``config_overrides`` validates; its resolved config,
    written as YAML and read back, validates to an equal config. Returns the config."""
    from omegaconf import OmegaConf

    from paperhooks import recipe as R
    from paperhooks import schema
    from paperhooks.errors import ConfigKeyError

    overrides = dict(config_overrides or {})
    try:
        (entry,) = R.validate(tiny_recipe([{"name": name, **overrides}])).plugins
    except PaperhooksError as e:
        raise ConformanceError(f"plugin {name!r}: a recipe with {overrides} does not validate: {e}") from e
    config = entry.config
    if not isinstance(config, entry.cls.Config):
        _fail(name, f"the recipe built a {type(config).__name__}, not its Config {entry.cls.Config.__name__}")
    plain = schema.to_plain(config)
    for key, value in overrides.items():
        if plain.get(key) != _plain(value):
            _fail(name, f"{key} = {value!r} in the recipe resolved to {plain.get(key)!r}")
    text = OmegaConf.to_yaml(OmegaConf.create({"plugins": [{"name": name, **plain}]}))
    reread = OmegaConf.to_container(OmegaConf.create(text))["plugins"]  # type: ignore[index]
    try:
        (again,) = R.validate(tiny_recipe(reread)).plugins
    except PaperhooksError as e:
        raise ConformanceError(f"plugin {name!r}: its resolved config {plain} does not validate again: {e}") from e
    if again.config != config:
        _fail(name, f"the config changed through YAML: {config!r} -> {again.config!r}")
    with contextlib.suppress(ConfigKeyError):
        R.validate(tiny_recipe([{"name": name, **plain, "no_such_key": 1}]))
        _fail(name, "a recipe with an unknown config key 'no_such_key' was accepted")
    return config


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# -- property checks ------------------------------------------------------------------------------------
def check_family(plugin: str | Plugin, plugin_config: Mapping[str, Any] | None = None, **options: Any) -> None:
    """The property checks of the plugin's family (see :mod:`paperhooks.testing.families`).

    :param plugin: an entry-point name (built with ``plugin_config``) or a plugin instance.
    :param options: keyword options of the family's check (e.g. ``reads_losses=False``).
    """
    instance = make_plugin(plugin, plugin_config) if isinstance(plugin, str) else plugin
    check = FAMILY_CHECKS.get(instance.family)
    if check is None:
        _fail(label(instance), f"family {instance.family!r} is not one of {', '.join(FAMILY_CHECKS)}")
    check(instance, **options)


# -- runs ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fit(raw: Mapping[str, Any], resume: Path | str | None = None) -> tuple[Any, dict[str, float]]:
    from paperhooks import recipe as R
    from paperhooks.run import fit

    with _quiet():
        return fit(R.validate(raw), resume=None if resume is None else str(resume))


def _plugin_entry(name: str, plugin_config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"name": name, **dict(plugin_config or {})}


def check_few_steps(name: str, plugin_config: Mapping[str, Any] | None, tmp_path: Path) -> dict[str, float]:
    """One epoch of :func:`tiny_recipe` (11 steps, then one validation batch), in-process.

    Every logged metric and every final weight is finite, and the checkpoint (plugin state
    included) loads with ``weights_only=True``. Returns the final metrics.
    """
    raw = tiny_recipe(
        [_plugin_entry(name, plugin_config)],
        run_dir=Path(tmp_path) / "runs",
        name="few-steps",
        trainer={"max_steps": -1, "max_epochs": 1, "limit_val_batches": 1},
    )
    built, metrics = _fit(raw)
    try:
        ckpt = load_checkpoint(built.run_dir)
    except Exception as e:  # noqa: BLE001 - e.g. plugin state that weights_only refuses
        raise ConformanceError(f"plugin {name!r}: the checkpoint does not load with weights_only=True: {e}") from e
    if ckpt["global_step"] < 1:
        _fail(name, "trained no step")
    if not any(k.startswith("train/") for k in metrics):
        _fail(name, f"no training loss was logged; metrics: {sorted(metrics)}")
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        _fail(name, f"metrics are not finite after {ckpt['global_step']} steps: {bad}")
    weights = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if weights:
        _fail(name, f"weights are not finite after {ckpt['global_step']} steps: {weights}")
    return metrics


def check_resume(name: str, plugin_config: Mapping[str, Any] | None, tmp_path: Path, *, stop: int = 13, max_steps: int = 16) -> None:
    """A run resumed from its ``step{stop}.ckpt`` ends bit-identical to the run that did not stop.

    Compared: weights, optimizer and scheduler states, plugin states and pruning sparsity.
    The default ``stop`` is 2 steps into the second epoch; dropout makes RNG state matter.
    """
    raw = tiny_recipe(
        [_plugin_entry(name, plugin_config)],
        run_dir=Path(tmp_path) / "runs",
        name="full",
        trainer={"max_steps": max_steps, "checkpoint_every_n_steps": stop, "limit_val_batches": 0},
    )
    full, _ = _fit(raw)
    end = load_checkpoint(full.run_dir)
    mid = load_checkpoint(full.run_dir, f"step{stop}.ckpt")
    if mid["global_step"] != stop or end["global_step"] != max_steps:
        _fail(name, f"expected checkpoints at steps {stop} and {max_steps}, got {mid['global_step']} and {end['global_step']}")
    if all(torch.equal(mid["state_dict"][k], end["state_dict"][k]) for k in end["state_dict"]):
        _fail(name, f"the weights did not change between steps {stop} and {max_steps}")
    resumed, _ = _fit({**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / f"step{stop}.ckpt")
    again = load_checkpoint(resumed.run_dir)
    try:
        assert again["global_step"] == max_steps, f"resumed run ended at step {again['global_step']}"
        assert_states_close(end["state_dict"], again["state_dict"], atol=0)
        assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
        assert_nested_equal(end["lr_schedulers"], again["lr_schedulers"], "lr_schedulers")
        assert_nested_equal(end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states")
        assert_nested_equal(end["paperhooks"]["sparsity"], again["paperhooks"]["sparsity"], "sparsity")
    except AssertionError as e:
        raise ConformanceError(f"plugin {name!r}: resuming from step {stop} does not end bit-identical: {e}") from e


def check_ddp_equals_single(
    name: str,
    plugin_config: Mapping[str, Any] | None,
    tmp_path: Path,
    strategy: str = "ddp",
    *,
    devices: int = 2,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> None:
    """``devices`` processes under ``strategy`` end where 1 process ends on the global batch.

    Both runs go through ``paperhooks fit`` in a subprocess (6 steps, global batch 64).
    Weights must agree within ``atol``/``rtol`` and plugin states likewise. Skipped (with
    pytest) when the plugin declares the strategy unsupported.
    """
    from omegaconf import OmegaConf

    support = check_entry_point(name).strategies.get(strategy, "untested")
    if support == "unsupported":
        pytest.skip(f"plugin {name!r} declares strategy {strategy!r} unsupported")
    tmp_path = Path(tmp_path)
    raw = tiny_recipe(
        [_plugin_entry(name, plugin_config)], run_dir=tmp_path / "runs", trainer={"limit_val_batches": 0}, batch_size=64
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(path, [f"name={strategy}", f"trainer.devices={devices}", f"trainer.strategy={strategy}"], cwd=tmp_path)
    )
    try:
        assert one["global_step"] == many["global_step"], f"steps differ: {one['global_step']} and {many['global_step']}"
        assert_states_close(one["state_dict"], many["state_dict"], atol=atol, rtol=rtol)
        assert_nested_close(one["paperhooks"]["plugins"], many["paperhooks"]["plugins"], "plugin states", atol=atol, rtol=rtol)
    except AssertionError as e:
        raise ConformanceError(
            f"plugin {name!r}: {devices} processes under {strategy!r} differ from 1 process on the global batch: {e}"
        ) from e


def assert_nested_close(a: Any, b: Any, where: str = "", *, atol: float, rtol: float) -> None:
    """:func:`~paperhooks.testing.assert_nested_equal` with a tolerance on floats and float tensors."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys differ"
        for k in a:
            assert_nested_close(a[k], b[k], f"{where}.{k}", atol=atol, rtol=rtol)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_close(x, y, f"{where}[{i}]", atol=atol, rtol=rtol)
    else:
        assert_nested_equal(a, b, where)


# -- pytest -----------------------------------------------------------------------------------------------
class PluginConformance:
    """Every check of the kit as pytest tests; inherit it in a class named ``Test...``.

    :cvar name: the plugin's entry-point name.
    :cvar plugin_config: recipe values under which the plugin acts within the few steps of
        the run checks (e.g. a short burn-in); also used by the property checks.
    :cvar family_options: keyword options of the family's property check.
    """

    name: ClassVar[str] = ""
    plugin_config: ClassVar[Mapping[str, Any]] = {}
    family_options: ClassVar[Mapping[str, Any]] = {}

    def _name(self) -> str:
        if not self.name:
            raise ConformanceError(f"{type(self).__name__} must set `name` to the plugin's entry-point name")
        return self.name

    def test_loads_through_its_entry_point(self) -> None:
        check_entry_point(self._name())

    def test_metadata_is_complete(self) -> None:
        check_metadata(check_entry_point(self._name()), self._name())

    def test_recipe_config_round_trips(self) -> None:
        check_recipe_roundtrip(self._name(), self.plugin_config)

    def test_family_properties_hold(self) -> None:
        check_family(self._name(), self.plugin_config, **self.family_options)

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        check_few_steps(self._name(), self.plugin_config, tmp_path)

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        check_resume(self._name(), self.plugin_config, tmp_path)

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        check_ddp_equals_single(self._name(), self.plugin_config, tmp_path)


__all__ = [
    "ConformanceError",
    "PluginConformance",
    "assert_nested_close",
    "check_ddp_equals_single",
    "check_entry_point",
    "check_family",
    "check_few_steps",
    "check_metadata",
    "check_recipe_roundtrip",
    "check_resume",
    "discovered",
    "make_plugin",
    "tiny_recipe",
]
