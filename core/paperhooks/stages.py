"""Multi-stage recipes: several Lightning fits in a row, state passed from one to the next.

A recipe may declare ``stages``; each is a fit of the recipe with the stage's sections
merged over it (``trainer``, ``optimizer``, ``objective``, ``seed`` deep-merged; ``plugins``
replaced)::

    stages:
      - {name: prune, trainer: {max_steps: 200}, plugins: [{name: gradual-pruning, final_sparsity: 0.9}]}
      - {name: retrain, trainer: {max_steps: 100}, optimizer: {lr: 0.01}, plugins: []}

Every stage is validated before the first one trains. Between stages the model passes as
plain weights — reparameterizations merged (``reparam.merge``), so the next stage's plugins
set up on the merged weights — plus the pruning masks, which stay in force (pruned weights
stay exactly zero) whether or not the next stage prunes further. A preference stage's
reference model is the policy the stage starts from. The optimizer, schedulers and plugin
states start fresh in every stage.

The run directory records everything: ``stages/<i>-<name>/`` holds each stage's
``recipe.yaml``, ``checkpoints/``, ``logs/`` and ``metrics.json``; ``stages.json`` lists the
stages with their status and final metrics; the top ``metrics.json`` is the last stage's.
Resuming from a checkpoint of stage ``i`` (``--resume RUN/stages/<i>-<name>/checkpoints/
last.ckpt``) finishes stage ``i`` bit-identically and runs the stages after it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from paperhooks.errors import RecipeError

STAGE_KEYS = {"name", "trainer", "optimizer", "objective", "seed", "plugins"}
_MERGED = ("trainer", "optimizer", "objective")


def stage_raws(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The raw recipe of every stage: the base recipe with the stage's sections merged in."""
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("stages must be a non-empty list of mappings, each with a 'name'")
    base = {k: v for k, v in raw.items() if k != "stages"}
    out, seen = [], set()
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"]:
            raise RecipeError(f"stages[{i}] must be a mapping with a 'name' (str), got {stage!r}")
        name = stage["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in seen:
            raise RecipeError(f"stages[{i}].name {name!r} must be unique and use letters, digits, '-', '_', '.'")
        seen.add(name)
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise RecipeError(
                f"stages[{i}] ({name}): unknown keys {sorted(unknown)}; a stage may set {', '.join(sorted(STAGE_KEYS))}"
            )
        merged = copy.deepcopy(base)
        for key in _MERGED:
            if key in stage:
                if not isinstance(stage[key], dict):
                    raise RecipeError(f"stages[{i}].{key} must be a mapping, got {stage[key]!r}")
                merged[key] = {**(merged.get(key) or {}), **stage[key]}
        if "seed" in stage:
            merged["seed"] = stage["seed"]
        if "plugins" in stage:
            merged["plugins"] = copy.deepcopy(stage["plugins"])
        merged["name"] = f"{base.get('name', 'run')}-{name}"
        out.append((name, merged))
    return out


def validate_stages(raw: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Validate every stage completely (errors name the stage)."""
    from paperhooks.recipe import validate

    stages = []
    for i, (name, merged) in enumerate(stage_raws(raw)):
        try:
            recipe = validate(merged)
        except RecipeError as e:
            raise type(e)(f"stages[{i}] ({name}): {e}") from None
        if recipe.trainer.strategy_kind in ("fsdp2", "fsdp", "deepspeed"):
            raise RecipeError(
                f"stages[{i}] ({name}): stages pass the whole model state between fits, which is implemented for "
                f"one process and ddp, not for the sharded strategy {recipe.trainer.strategy_kind!r}"
            )
        stages.append((name, recipe))
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
        module.model.load_state_dict(carried.weights)
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


def _masks_in_checkpoint(path: str) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return any(k.startswith("model.") and k.endswith(".mask") for k in state)


def _resume_stage(resume: str | None, names: list[str]) -> int:
    if resume is None:
        return 0
    m = re.search(r"stages[/\\](\d+)-([A-Za-z0-9_.-]+)[/\\]checkpoints[/\\]", str(Path(resume).resolve()))
    if m is None or int(m.group(1)) >= len(names) or names[int(m.group(1))] != m.group(2):
        raise RecipeError(
            f"--resume {resume}: a staged run resumes from a checkpoint under RUN/stages/<i>-<name>/checkpoints/ "
            f"of this recipe (stages: {', '.join(f'{i}-{n}' for i, n in enumerate(names))})"
        )
    return int(m.group(1))


def fit_stages(recipe: Any, resume: str | None = None, run_dir: Path | None = None) -> tuple[Any, dict[str, float]]:
    """Fit every stage in order; return the last stage's ``Built`` (with the top run dir)."""
    from paperhooks import pruning
    from paperhooks.run import _new_run_dir, _write_recipe, build, final_metrics

    names = [n for n, _ in recipe.stages]
    first = _resume_stage(resume, names)
    top = run_dir or _new_run_dir(recipe)
    record: list[dict[str, Any]] = [
        {"stage": n, "status": "skipped (resumed at a later stage)"} for n in names[:first]
    ]
    carried: Carried | None = None
    built = None
    metrics: dict[str, float] = {}
    for i, (name, stage) in enumerate(recipe.stages):
        if i < first:
            continue
        stage_dir = top / "stages" / f"{i}-{name}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        built = build(stage, stage_dir)
        if built.trainer.is_global_zero and i == first:
            _write_recipe(top / "recipe.yaml", {**recipe.raw, "plugin_versions": recipe.plugin_versions})
        ckpt = resume if i == first else None
        if ckpt is not None:
            built.module.configure_model()
            if not built.module.masks and _masks_in_checkpoint(ckpt):
                built.module.masks = pruning.add_masks(built.module.model)
        else:
            start_from(built.module, carried)
        kwargs = {"ckpt_path": ckpt, "weights_only": True} if ckpt else {}
        built.trainer.fit(built.module, datamodule=built.datamodule, **kwargs)
        metrics = final_metrics(built)
        carried = carry(built.module)
        record.append({"stage": name, "status": "done", "dir": str(stage_dir.relative_to(top)), "metrics": metrics})
        if built.trainer.is_global_zero:
            (top / "stages.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    assert built is not None
    if built.trainer.is_global_zero:
        (top / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return dataclasses.replace(built, recipe=recipe, run_dir=top), metrics


__all__ = ["STAGE_KEYS", "Carried", "carry", "fit_stages", "stage_raws", "start_from", "validate_stages"]
