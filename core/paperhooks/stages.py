"""Multi-stage recipes: several Lightning fits in a row, state passed from one to the next.

A recipe may declare ``stages``; each is a fit of the recipe with the stage's sections
merged over it (``trainer``, ``optimizer``, ``objective``, ``data``, ``seed`` deep-merged;
``plugins`` replaced). A stage's ``data`` may change what the fit trains on (digits'
``train_classes``, the batch size, label noise...) but not the dataset (``name``) or the
train/validation split (``val_fraction``)::

    stages:
      - {name: prune, trainer: {max_steps: 200}, plugins: [{name: gradual-pruning, final_sparsity: 0.9}]}
      - {name: retrain, trainer: {max_steps: 100}, optimizer: {lr: 0.01}, plugins: []}

Every stage is validated before the first one trains. Between stages the model passes as
plain weights — reparameterizations merged (``reparam.merge``), so the next stage's plugins
set up on the merged weights — plus the pruning masks, which stay in force (pruned weights
stay exactly zero) whether or not the next stage prunes further. A preference stage's
reference model is the policy the stage starts from. The optimizer, schedulers and plugin
states start fresh in every stage.

A stage may instead train several **ingredients** from the state it starts from — each a fit
with its own overrides (``seed``, ``optimizer``, ``trainer``, ``plugins``...) merged over the
stage; all ingredients share the stage's data split, an ingredient's ``seed`` changes its batch
order and randomness (SMS's ``pruned_seed``) — and pass on their **soup** (Sparse Model Soups, Zimmer et al. 2023; procedure of
``ZIB-IOL/SMS`` ``ensembleStrategies.py``): ``uniform`` averages every weight (1/m each;
the masks, identical in every ingredient, are kept), ``greedy`` sorts the ingredients by
``monitor`` (descending) and adds each to the soup when the soup's metric does not drop
(``≥``). With ``recalibrate_bn`` the BatchNorm statistics of every candidate are recomputed
on the first ``bn_fraction`` of the (unshuffled) training data, identically on every rank::

      - name: soup
        ingredients: [{seed: 1}, {seed: 2}, {seed: 3, optimizer: {weight_decay: 0.0005}}]
        soup: {method: uniform, recalibrate_bn: true}

The run directory records everything: ``stages/<i>-<name>/`` holds each stage's
``recipe.yaml``, ``checkpoints/``, ``logs/`` and ``metrics.json``; ``stages.json`` lists the
stages with their status and final metrics; the top ``metrics.json`` is the last stage's.
Resuming from a checkpoint of stage ``i`` (``--resume RUN/stages/<i>-<name>/checkpoints/
last.ckpt``) finishes stage ``i`` bit-identically and runs the stages after it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Literal

import torch

from paperhooks.errors import RecipeError

STAGE_KEYS = {
    "name",
    "trainer",
    "optimizer",
    "objective",
    "data",
    "seed",
    "plugins",
    "ingredients",
    "soup",
}
INGREDIENT_KEYS = {"trainer", "optimizer", "objective", "seed", "plugins"}
_MERGED = ("trainer", "optimizer", "objective", "data")
#: data keys every stage shares: one dataset, one train/validation split
_FIXED_DATA = ("name", "val_fraction")


@dataclasses.dataclass(frozen=True)
class SoupConfig:
    """How a stage's ingredients are combined (``stages[i].soup``).

    :ivar method: ``uniform`` (average all) or ``greedy`` (add an ingredient when the soup's
        ``monitor`` does not drop).
    :ivar monitor: the validation metric greedy soups maximize.
    :ivar recalibrate_bn: recompute BatchNorm running statistics of every candidate soup.
    :ivar bn_fraction: the fraction of the training data used to recalibrate (SMS: all).
    """

    method: Literal["uniform", "greedy"] = "uniform"
    monitor: str = "val/acc"
    recalibrate_bn: bool = True
    bn_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.bn_fraction <= 1:
            raise ValueError(f"bn_fraction must be in (0, 1], got {self.bn_fraction}")


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key in _MERGED:
        if key in over:
            if not isinstance(over[key], dict):
                raise RecipeError(f"{where}.{key} must be a mapping, got {over[key]!r}")
            merged[key] = {**(merged.get(key) or {}), **over[key]}
    if "seed" in over:
        merged["seed"] = over["seed"]
    if "plugins" in over:
        merged["plugins"] = copy.deepcopy(over["plugins"])
    return merged


def stage_raws(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The raw recipe of every stage: the base recipe with the stage's sections merged in."""
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("stages must be a non-empty list of mappings, each with a 'name'")
    base = {k: v for k, v in raw.items() if k != "stages"}
    out, seen = [], set()
    for i, stage in enumerate(stages):
        if (
            not isinstance(stage, dict)
            or not isinstance(stage.get("name"), str)
            or not stage["name"]
        ):
            raise RecipeError(f"stages[{i}] must be a mapping with a 'name' (str), got {stage!r}")
        name = stage["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in seen:
            raise RecipeError(
                f"stages[{i}].name {name!r} must be unique and use letters, digits, '-', '_', '.'"
            )
        seen.add(name)
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise RecipeError(
                f"stages[{i}] ({name}): unknown keys {sorted(unknown)}; a stage may set {', '.join(sorted(STAGE_KEYS))}"
            )
        fixed = [
            k for k in _FIXED_DATA if isinstance(stage.get("data"), dict) and k in stage["data"]
        ]
        if fixed:
            raise RecipeError(
                f"stages[{i}] ({name}): data.{fixed[0]} cannot change between stages: every stage trains on "
                "the recipe's dataset and its one train/validation split; a stage may set the other data "
                "keys (e.g. train_classes, batch_size)"
            )
        merged = _merge(base, stage, f"stages[{i}]")
        merged["name"] = f"{base.get('name', 'run')}-{name}"
        out.append((name, merged))
    return out


def _ingredients(
    stage: dict[str, Any], merged: dict[str, Any], i: int, name: str
) -> list[dict[str, Any]]:
    items = stage.get("ingredients")
    if items is None:
        if "soup" in stage:
            raise RecipeError(f"stages[{i}] ({name}): soup needs ingredients")
        return []
    if not isinstance(items, list) or len(items) < 2:
        raise RecipeError(
            f"stages[{i}] ({name}): ingredients must be a list of at least 2 mappings"
        )
    out = []
    for j, item in enumerate(items):
        where = f"stages[{i}].ingredients[{j}]"
        if not isinstance(item, dict) or set(item) - INGREDIENT_KEYS:
            raise RecipeError(
                f"{where} must be a mapping of {', '.join(sorted(INGREDIENT_KEYS))}, got {item!r}"
            )
        raw = _merge(merged, item, where)
        raw["name"] = f"{merged['name']}-ingredient{j}"
        out.append(raw)
    return out


def validate_stages(raw: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Validate every stage completely (errors name the stage)."""
    from paperhooks import schema
    from paperhooks.recipe import validate

    stages = []
    for i, (name, merged) in enumerate(stage_raws(raw)):
        stage = raw["stages"][i]
        try:
            recipe = validate(merged)
            ingredients = tuple(validate(r) for r in _ingredients(stage, merged, i, name))
            soup = schema.build(SoupConfig, stage.get("soup") or {}, "soup")
        except RecipeError as e:
            raise type(e)(f"stages[{i}] ({name}): {e}") from None
        for r in (recipe, *ingredients):
            if r.trainer.strategy_kind in ("fsdp2", "fsdp", "deepspeed"):
                raise RecipeError(
                    f"stages[{i}] ({name}): stages pass the whole model state between fits, which is implemented for "
                    f"one process and ddp, not for the sharded strategy {r.trainer.strategy_kind!r}"
                )
        stages.append((name, dataclasses.replace(recipe, ingredients=ingredients, soup=soup)))
    return tuple(stages)


@dataclasses.dataclass
class Carried:
    """What passes from a stage to the next: plain weights and the pruning masks."""

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


def carry(module: Any) -> Carried:
    """The module's model with reparameterizations merged, and its masks (copies)."""
    from paperhooks.reparam import merge

    masks = {k: m.mask.detach().clone() for k, m in module.masks.items()}
    model = merge(copy.deepcopy(module.model), module.plugins)
    return Carried({k: v.detach().clone() for k, v in model.state_dict().items()}, masks)


def start_from(module: Any, carried: Carried | None) -> None:
    """Load carried weights into a fresh module, set it up, and put the masks back in force."""
    from paperhooks import pruning

    if carried is not None:
        try:
            module.model.load_state_dict(carried.weights)
        except RuntimeError as e:
            raise RecipeError(
                "stages: this stage's model does not take the weights the stage before passed on "
                f"(does its data change the input shape or the number of classes?): {e}"
            ) from None
        if getattr(module, "reference_model", None) is not None:
            module.reference_model.load_state_dict(carried.weights)
    module.configure_model()
    if carried is not None and carried.masks:
        if not module.masks:
            module.masks = pruning.add_masks(module.model)
        with torch.no_grad():
            for k, m in module.masks.items():
                m.mask.copy_(carried.masks[k])
            pruning.zero_pruned(module.model, module.masks)
        module.sparsity = pruning.sparsity_of(module.masks)


def _masks_in_checkpoint(path: str | Path) -> bool:
    from paperhooks import pruning

    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return pruning.has_masks({k: v for k, v in state.items() if k.startswith("model.")})


_RESUME = re.compile(
    r"stages[/\\](\d+)-([A-Za-z0-9_.-]+)[/\\](?:ingredient-(\d+)[/\\])?checkpoints[/\\]"
)


def _resume_point(resume: str | None, recipe: Any) -> tuple[int, int | None, Path | None]:
    """``(stage, ingredient or None, old run dir)`` of a resume checkpoint of a staged run."""
    if resume is None:
        return 0, None, None
    names = [n for n, _ in recipe.stages]
    path = Path(resume).resolve()
    m = _RESUME.search(str(path))
    ok = m is not None and int(m.group(1)) < len(names) and names[int(m.group(1))] == m.group(2)
    if ok and m.group(3) is not None:
        ok = int(m.group(3)) < len(recipe.stages[int(m.group(1))][1].ingredients)
    if not ok:
        raise RecipeError(
            f"--resume {resume}: a staged run resumes from a checkpoint under RUN/stages/<i>-<name>/checkpoints/ "
            f"(or .../<i>-<name>/ingredient-<j>/checkpoints/) of this recipe "
            f"(stages: {', '.join(f'{i}-{n}' for i, n in enumerate(names))})"
        )
    assert m is not None
    old_top = Path(str(path)[: m.start()])
    return int(m.group(1)), None if m.group(3) is None else int(m.group(3)), old_top


def _fit_one(
    recipe: Any,
    where: Path,
    carried: Carried | None,
    ckpt: str | Path | None,
    split_seed: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """One fit of a stage or an ingredient, from ``carried`` or resumed from ``ckpt``."""
    from paperhooks import pruning
    from paperhooks.run import build, final_metrics

    where.mkdir(parents=True, exist_ok=True)
    built = build(recipe, where, split_seed)
    if ckpt is not None:
        built.module.configure_model()
        if not built.module.masks and _masks_in_checkpoint(ckpt):
            built.module.masks = pruning.add_masks(built.module.model)
    else:
        start_from(built.module, carried)
    kwargs = {"ckpt_path": str(ckpt), "weights_only": True} if ckpt else {}
    built.trainer.fit(built.module, datamodule=built.datamodule, **kwargs)
    metrics = final_metrics(built)
    if built.trainer.is_global_zero:  # read back when a resume starts after this fit (greedy soups)
        (where / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return built, metrics


def average(states: list[Carried]) -> Carried:
    """The uniform soup: every floating tensor averaged, others (counters) from the last; the
    masks must be the same in every ingredient (they are kept)."""
    first = states[0]
    for s in states[1:]:
        if s.masks.keys() != first.masks.keys() or any(
            not torch.equal(s.masks[k], first.masks[k]) for k in first.masks
        ):
            raise RecipeError(
                "soup: the ingredients' pruning masks differ; a soup averages ingredients of one mask"
            )
    weights = {}
    for k, v in states[-1].weights.items():
        weights[k] = (
            torch.stack([s.weights[k] for s in states]).mean(0)
            if v.is_floating_point()
            else v.clone()
        )
    return Carried(weights, {k: v.clone() for k, v in states[-1].masks.items()})


@torch.no_grad()
def recalibrate_bn(module: Any, datamodule: Any, fraction: float = 1.0) -> None:
    """Reset every BatchNorm's running statistics and recompute them (cumulative average) over
    the first ``fraction`` of the unshuffled training set, in training mode. Every rank goes
    through the same rows, so the statistics are identical on all ranks and equal 1 process."""
    bns = [
        m for m in module.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    rows = datamodule.train_set.tensors
    n = max(1, int(fraction * rows["index"].shape[0]))
    was = module.model.training
    module.model.train()
    try:
        for start in range(0, n, datamodule.batch_size):
            batch = {
                k: v[start : min(start + datamodule.batch_size, n)].to(module.device)
                for k, v in rows.items()
            }
            module.outputs(batch)
    finally:
        module.model.train(was)
        for m, momentum in saved:
            m.momentum = momentum


def _evaluate(built: Any, candidate: Carried, soup: SoupConfig) -> tuple[Carried, dict[str, float]]:
    """Load ``candidate`` into a fresh module of the stage, recalibrate BN, validate."""
    from paperhooks.run import build_module

    r = built.recipe
    dm = built.datamodule
    module = build_module(r, dm.info, (len(dm.train_set), len(dm.val_set)))
    start_from(module, candidate)
    module.to(built.module.device)
    if soup.recalibrate_bn:
        recalibrate_bn(module, dm, soup.bn_fraction)
    metrics: dict[str, float] = {}
    if r.trainer.limit_val_batches != 0:
        built.trainer.validate(module, datamodule=dm, verbose=False)
        metrics = {
            k: float(v)
            for k, v in built.trainer.callback_metrics.items()
            if v.numel() == 1 and k.startswith("val/")
        }
    return carry(module), metrics


def _soup(
    built: Any, results: list[tuple[Carried, dict[str, float]]], soup: SoupConfig
) -> tuple[Carried, dict[str, Any]]:
    if soup.method == "uniform":
        state, metrics = _evaluate(built, average([c for c, _ in results]), soup)
        return state, {"method": "uniform", "used": list(range(len(results))), "metrics": metrics}
    missing = [j for j, (_, m) in enumerate(results) if soup.monitor not in m]
    if missing:
        raise RecipeError(
            f"soup: greedy soups need the validation metric {soup.monitor!r}; ingredients {missing} did not log it"
        )
    order = sorted(range(len(results)), key=lambda j: -results[j][1][soup.monitor])
    used = [order[0]]
    state, metrics = _evaluate(built, results[order[0]][0], soup)
    for j in order[1:]:
        cand, cand_metrics = _evaluate(built, average([results[u][0] for u in [*used, j]]), soup)
        if cand_metrics[soup.monitor] >= metrics[soup.monitor]:  # SMS: "≥"
            used, state, metrics = [*used, j], cand, cand_metrics
    return state, {"method": "greedy", "used": sorted(used), "metrics": metrics}


def _from_checkpoint(recipe: Any, path: Path, split_seed: int) -> tuple[Carried, dict[str, float]]:
    """The carried state of a finished fit, read from its final checkpoint."""
    from paperhooks import pruning
    from paperhooks.run import build_module
    from paperhooks.tasks import build_datamodule

    dm = build_datamodule(recipe.data.name, recipe.data.config, split_seed)
    module = build_module(recipe, dm.info, (len(dm.train_set), len(dm.val_set)))
    module.configure_model()
    if not module.masks and _masks_in_checkpoint(path):
        module.masks = pruning.add_masks(module.model)
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    metrics_file = path.parent.parent / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return carry(module), metrics


def _stage_end(recipe: Any, i: int, top: Path) -> Carried:
    """What stage ``i`` of an earlier run passed on: its soup, or its final checkpoint."""
    name, stage = recipe.stages[i]
    where = top / "stages" / f"{i}-{name}"
    if (where / "soup_weights.pt").exists():
        load = functools.partial(torch.load, map_location="cpu", weights_only=True)
        return Carried(load(where / "soup_weights.pt"), load(where / "soup_masks.pt"))
    return _from_checkpoint(stage, where / "checkpoints" / "last.ckpt", stage.seed)[0]


def fit_stages(
    recipe: Any, resume: str | None = None, run_dir: Path | None = None
) -> tuple[Any, dict[str, float]]:
    """Fit every stage in order; return the last stage's ``Built`` (with the top run dir)."""
    from paperhooks.run import _new_run_dir, _write_recipe

    first, first_ingredient, old_top = _resume_point(resume, recipe)
    top = run_dir or _new_run_dir(recipe)
    names = [n for n, _ in recipe.stages]
    record: list[dict[str, Any]] = [
        {"stage": n, "status": "skipped (resumed at a later stage)"} for n in names[:first]
    ]
    carried: Carried | None = None
    if first_ingredient is not None and first > 0:  # the soup stage's start: the stage before it
        assert old_top is not None
        carried = _stage_end(recipe, first - 1, old_top)
    built: Any = None
    metrics: dict[str, float] = {}
    for i, (name, stage) in enumerate(recipe.stages):
        if i < first:
            continue
        stage_dir = top / "stages" / f"{i}-{name}"
        entry: dict[str, Any] = {"stage": name, "dir": str(stage_dir.relative_to(top))}
        if not stage.ingredients:
            built, metrics = _fit_one(stage, stage_dir, carried, resume if i == first else None)
            carried = carry(built.module)
        else:
            results, entry["ingredients"] = [], []
            for j, ing in enumerate(stage.ingredients):
                where = stage_dir / f"ingredient-{j}"
                if i == first and first_ingredient is not None and j < first_ingredient:
                    assert old_top is not None
                    old = (
                        old_top
                        / "stages"
                        / f"{i}-{name}"
                        / f"ingredient-{j}"
                        / "checkpoints"
                        / "last.ckpt"
                    )
                    results.append(_from_checkpoint(ing, old, stage.seed))
                    entry["ingredients"].append(
                        {"dir": str(old), "status": "done (earlier run)", "metrics": results[-1][1]}
                    )
                    continue
                ckpt = resume if (i == first and first_ingredient == j) else None
                built, m = _fit_one(ing, where, carried, ckpt, split_seed=stage.seed)
                results.append((carry(built.module), m))
                entry["ingredients"].append(
                    {"dir": str(where.relative_to(top)), "status": "done", "metrics": m}
                )
            carried, entry["soup"] = _soup(built, results, stage.soup)
            metrics = entry["soup"]["metrics"]
            if built.trainer.is_global_zero:
                torch.save(carried.weights, stage_dir / "soup_weights.pt")
                torch.save(carried.masks, stage_dir / "soup_masks.pt")
        entry.update(status="done", metrics=metrics)
        record.append(entry)
        if built.trainer.is_global_zero:
            if i == first:
                _write_recipe(
                    top / "recipe.yaml", {**recipe.raw, "plugin_versions": recipe.plugin_versions}
                )
            (top / "stages.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    assert built is not None
    if built.trainer.is_global_zero:
        (top / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return dataclasses.replace(built, recipe=recipe, run_dir=top), metrics


__all__ = [
    "STAGE_KEYS",
    "Carried",
    "SoupConfig",
    "average",
    "carry",
    "fit_stages",
    "recalibrate_bn",
    "stage_raws",
    "start_from",
    "validate_stages",
]
