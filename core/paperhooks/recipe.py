"""Recipes: YAML (OmegaConf) files that say what to train and which plugins to use.

A recipe is data. It names registered models and datasets and installed plugins; it never
imports a dotted path or evaluates code. Everything is validated before any training::

    seed: 0
    name: digits-reweighted
    model: {name: timm, arch: test_resnet}
    data: {name: digits, batch_size: 64, duplicates: {fraction: 0.1, copies: 20}}
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
    trainer: {max_epochs: 5, strategy: auto, devices: 1}
    plugins:
      - name: loss-reweighting
        strategy: linupper
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from paperhooks import schema
from paperhooks.errors import (
    ConfigKeyError,
    ConfigTypeError,
    RecipeError,
    UnsupportedStrategyError,
    did_you_mean,
)

log = logging.getLogger(__name__)

StrategyName = Literal["auto", "single", "ddp", "fsdp2", "fsdp", "deepspeed"]


@dataclass(frozen=True)
class OptimizerSection:
    """The built-in optimizer (used when no optimizer plugin is in the recipe)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["none", "cosine"] = "none"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.momentum < 0:
            raise ValueError("weight_decay and momentum must be >= 0")


@dataclass(frozen=True)
class TrainerSection:
    """The Lightning Trainer settings a recipe may set."""

    max_epochs: int | None = None
    max_steps: int = -1
    devices: int = 1
    strategy: StrategyName = "auto"
    accelerator: Literal["cpu", "gpu", "cuda", "auto"] = "cpu"
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true"] = "32-true"
    deterministic: bool = True
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    #: DDP only: let a parameter get no gradient on some ranks in a step (a module a plugin
    #: calls on some rows only). Without it DDP's ranks would wait on each other forever, so
    #: the rank lacking a gradient stops with an error naming this key. FSDP2 handles plugin
    #: modules this way without the setting.
    find_unused_parameters: bool = False
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    limit_val_batches: float | None = None
    checkpoint_every_n_steps: int | None = None
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.max_epochs is None and self.max_steps < 0:
            raise ValueError("set max_epochs or max_steps")

    @property
    def strategy_kind(self) -> str:
        """The kind used for plugin support checks: single, ddp, fsdp2, fsdp or deepspeed."""
        if self.strategy in ("auto", "single"):
            return "single" if self.devices == 1 else "ddp"
        return self.strategy


@dataclass(frozen=True)
class Section:
    """A registered model or dataset: its name and its validated config."""

    name: str
    config: Any


@dataclass(frozen=True)
class PluginEntry:
    name: str
    cls: type
    config: Any
    distribution: str
    version: str


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``raw`` is the resolved mapping, saved with runs and checkpoints."""

    seed: int
    name: str
    run_dir: str
    model: Section
    data: Section
    optimizer: OptimizerSection
    trainer: TrainerSection
    plugins: tuple[PluginEntry, ...]
    raw: dict[str, Any] = field(repr=False)
    #: the ``objective`` section (preference tasks): a :class:`~paperhooks.preference.PreferenceObjective`
    objective: Any = None
    #: ``(name, Recipe)`` per stage when the recipe declares ``stages`` (see :mod:`paperhooks.stages`)
    stages: tuple[tuple[str, Recipe], ...] = ()
    #: a stage's ingredient recipes and how they are combined (``paperhooks.stages.SoupConfig``)
    ingredients: tuple[Recipe, ...] = ()
    soup: Any = None

    @property
    def all_plugins(self) -> tuple[PluginEntry, ...]:
        """The plugin entries of every fit the recipe runs: its own, then each stage's and each
        ingredient's, in order (a plugin used by several appears once per use)."""
        out = list(self.plugins)
        for r in (*self.ingredients, *(stage for _, stage in self.stages)):
            out += r.all_plugins
        return tuple(out)

    @property
    def plugin_versions(self) -> dict[str, str]:
        """``name: distribution==version`` of every plugin, those of stages and ingredients too."""
        return {p.name: f"{p.distribution}=={p.version}" for p in self.all_plugins}


TOP_KEYS = {
    "seed": "int",
    "name": "str",
    "run_dir": "str",
    "model": "mapping with name",
    "data": "mapping with name",
    "optimizer": "mapping",
    "trainer": "mapping",
    "plugins": "list of mappings with name",
    "objective": "mapping (preference data only: beta, reference, eval_samples)",
    "stages": "list of mappings with name (each a fit; may set trainer, optimizer, objective, data, seed, plugins, ingredients, soup)",
    "plugin_versions": "mapping written by runs (name: distribution==version)",
}


def raw_plugin_entries(raw: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The plugin entries of a resolved recipe mapping (a run's ``recipe.yaml``): its own,
    then each stage's and each ingredient's, in order; the raw form of
    :attr:`Recipe.all_plugins`, for readers of run directories that do not validate."""
    entries = list(raw.get("plugins") or [])
    for stage in raw.get("stages") or []:
        entries += stage.get("plugins") or []
        for ingredient in stage.get("ingredients") or []:
            entries += ingredient.get("plugins") or []
    return entries


def load_raw(source: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe from a file or ``hf://owner/repo/path.yaml`` and apply ``key=value`` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = _fetch(str(source))
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException) as e:
        raise RecipeError(f"cannot read recipe {source}: {e}") from None
    if not isinstance(cfg, Mapping):
        raise RecipeError(f"recipe {source} must be a mapping with keys {', '.join(TOP_KEYS)}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(
                f"override {item!r} must look like key=value (e.g. trainer.max_epochs=3)"
            )
        parsed = OmegaConf.from_dotlist([f"x={value}"])["x"]
        try:
            OmegaConf.update(cfg, _override_key(cfg, key), parsed, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise RecipeError(f"cannot apply override {item!r}: {e}") from None
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise RecipeError(f"cannot resolve recipe {source}: {e}") from None
    return raw  # type: ignore[return-value]


def _override_key(cfg: Any, key: str) -> str:
    """``plugins.NAME.x`` or ``plugins.0.x`` → ``plugins[i].x``."""
    parts = key.split(".")
    if parts[0] == "plugins" and len(parts) > 1:
        plugins = list(cfg.get("plugins") or [])
        sel = parts[1]
        if sel.isdigit():
            idx = int(sel)
        else:
            names = [p.get("name") for p in plugins]
            if sel not in names:
                raise RecipeError(
                    f"override {key!r}: the recipe has no plugin {sel!r}; plugins: {names}"
                )
            idx = names.index(sel)
        if idx >= len(plugins):
            raise RecipeError(f"override {key!r}: the recipe has {len(plugins)} plugins")
        return f"plugins[{idx}]" + "".join(f".{p}" for p in parts[2:])
    return key


def _fetch(source: str) -> str:
    if not source.startswith("hf://"):
        return source
    rest = source[len("hf://") :]
    parts = rest.split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise RecipeError(f"{source}: a Hub recipe is hf://OWNER/REPO/PATH.yaml")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise RecipeError(f"cannot fetch recipe {source} from the Hugging Face Hub: {e}") from None


def _registered(section: str, raw: Any, registry: Mapping[str, Any]) -> Section:
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ConfigTypeError(
            f"{section} must be a mapping with a 'name' among: {', '.join(registry)}"
        )
    values = dict(raw)
    name = values.pop("name")
    if name not in registry:
        from paperhooks.tasks.registry import task_errors_hint

        raise ConfigTypeError(
            f"{section}.name {name!r} is not registered{did_you_mean(str(name), registry)}; "
            f"registered: {', '.join(registry)}{task_errors_hint()}"
        )
    return Section(name, schema.build(registry[name].config_cls, values, section))


def validate(raw: Mapping[str, Any]) -> Recipe:
    """Check a raw recipe completely (keys, types, plugins, combinations, strategy)."""
    from paperhooks import discovery
    from paperhooks.tasks.registry import DATASETS, MODELS, load_tasks

    for key in raw:
        if key not in TOP_KEYS:
            allowed = ", ".join(f"{k}: {v}" for k, v in TOP_KEYS.items())
            raise ConfigKeyError(
                f"unknown top-level key {key!r}{did_you_mean(str(key), TOP_KEYS)}; allowed keys: {allowed}"
            )
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigTypeError(f"seed must be int, got {seed!r}")
    for key in ("name", "run_dir"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigTypeError(f"{key} must be str, got {raw[key]!r}")
    plugins_raw = raw.get("plugins") or []
    if not isinstance(plugins_raw, list):
        raise ConfigTypeError("plugins must be a list of mappings, each with a 'name'")
    found = discovery.entry_points()
    entries = []
    for i, item in enumerate(plugins_raw):
        if not isinstance(item, Mapping) or "name" not in item:
            raise ConfigTypeError(f"plugins[{i}] must be a mapping with a 'name', got {item!r}")
        values = dict(item)
        name = values.pop("name")
        cls = discovery.load(name, found)
        config = schema.build(cls.Config, values, f"plugins[{i}] ({name})")
        entries.append(
            PluginEntry(name, cls, config, found[name].distribution, found[name].version)
        )
    _check_versions(raw.get("plugin_versions"), entries)
    # the built-in tasks and every installed plugin's (entry-point group paperhooks.tasks)
    load_tasks()
    model = _registered("model", raw.get("model"), MODELS)
    data = _registered("data", raw.get("data"), DATASETS)
    optimizer = schema.build(OptimizerSection, raw.get("optimizer") or {}, "optimizer")
    trainer = schema.build(TrainerSection, raw.get("trainer") or {}, "trainer")
    objective = None
    if raw.get("objective") is not None:
        from paperhooks.objective import PreferenceObjective

        objective = schema.build(PreferenceObjective, raw["objective"], "objective")
    _check_data_kind(entries, data, objective, DATASETS)
    recipe = Recipe(
        seed=seed,
        name=raw.get("name", "run"),
        run_dir=raw.get("run_dir", "runs"),
        model=model,
        data=data,
        optimizer=optimizer,
        trainer=trainer,
        plugins=tuple(entries),
        raw=dict(raw),
        objective=objective,
    )
    if raw.get("stages") is not None:
        from paperhooks.stages import validate_stages

        return dataclasses.replace(recipe, stages=validate_stages(dict(raw)))
    check_strategy(recipe)
    from paperhooks.manager import check_combination

    check_combination([(e.name, e.cls) for e in entries])
    return recipe


def _check_data_kind(
    entries: Sequence[PluginEntry], data: Section, objective: Any, datasets: Mapping[str, Any]
) -> None:
    """Plugins' ``tasks`` and the ``objective`` section against the dataset's declared kind.

    Datasets registered without ``task`` are checked when the module is built instead.
    """
    kind = datasets[data.name].task
    if kind is None:
        return
    for e in entries:
        if e.cls.tasks and kind not in e.cls.tasks:
            raise RecipeError(
                f"plugins.{e.name}: works on {' or '.join(e.cls.tasks)} data only; data {data.name!r} is {kind}"
            )
    if objective is not None and kind != "preference":
        raise RecipeError(
            f"objective: only preference data takes objective settings; data {data.name!r} is {kind}"
        )


#: (family, strategy kind) pairs the core itself cannot run yet, and why
CORE_UNSUPPORTED = {
    (
        "gradient-surgery",
        "fsdp",
    ): "the per-objective gradient engine does not support sharded parameters yet",
    ("gradient-surgery", "deepspeed"): "DeepSpeed ZeRO mishandles several backward passes per step",
    ("pruning", "fsdp"): (
        "masks are selected over FSDP2's row shards (DTensor, dim 0); Lightning's fsdp shards "
        "flattened FlatParameters, which the masks do not address; use 'fsdp2' (or 'ddp')"
    ),
}


def _check_versions(recorded: Any, entries: Sequence[PluginEntry]) -> None:
    """A run's recipe records plugin versions; say so when the installed ones differ."""
    if recorded is None:
        return
    if not isinstance(recorded, Mapping):
        raise ConfigTypeError(
            f"plugin_versions must be a mapping name: distribution==version, got {recorded!r}"
        )
    for e in entries:
        want = recorded.get(e.name)
        have = f"{e.distribution}=={e.version}"
        if want is not None and want != have:
            log.warning("recipe was run with %s; installed is %s", want, have)


def check_strategy(recipe: Recipe) -> None:
    """Refuse plugins that declare the strategy unsupported, and strategies that need CUDA."""
    t = recipe.trainer
    kind = t.strategy_kind
    if kind in ("fsdp", "deepspeed") and t.accelerator == "cpu":
        raise UnsupportedStrategyError(
            f"trainer.strategy {kind!r} needs CUDA (trainer.accelerator is 'cpu'); on CPU use 'ddp' or 'fsdp2'"
        )
    families = {e.cls.family for e in recipe.plugins}
    if kind == "fsdp2" and "pruning" in families and "reparameterization" in families:
        pruning = [e.name for e in recipe.plugins if e.cls.family == "pruning"]
        reparam = [e.name for e in recipe.plugins if e.cls.family == "reparameterization"]
        raise UnsupportedStrategyError(
            f"plugins {pruning} and {reparam}: pruning and reparameterization cannot be stacked under FSDP2 (use ddp): "
            "the mask would sit on a parametrization whose output FSDP2 does not shard by rows"
        )
    for e in recipe.plugins:
        why = CORE_UNSUPPORTED.get((e.cls.family, kind))
        if why:
            raise UnsupportedStrategyError(
                f"plugin {e.name!r} ({e.cls.family}) cannot run under strategy {kind!r}: {why}"
            )
        if (
            kind == "fsdp2"
            and e.cls.family == "gradient-surgery"
            and not getattr(e.cls, "columns_ok", False)
        ):
            raise UnsupportedStrategyError(
                f"plugin {e.name!r} (gradient-surgery) cannot run under strategy 'fsdp2': it declares columns_ok = False "
                "(it reads whole parameter blocks or keeps gradient vectors), and FSDP2 gives each rank only shards; "
                "use 'ddp'"
            )
        support = e.cls.strategies.get(kind, "untested")
        if support == "unsupported":
            ok = [k for k, v in e.cls.strategies.items() if v != "unsupported"]
            raise UnsupportedStrategyError(
                f"plugin {e.name!r} does not support strategy {kind!r}; it supports: {', '.join(ok)}"
            )


def load(source: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    return validate(load_raw(source, overrides))
