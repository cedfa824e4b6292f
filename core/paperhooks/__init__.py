"""paperhooks: training techniques from research papers as composable Lightning plugins.

One training step of :class:`HookedModule`, and where each family fires (plugins run in
recipe order at every point)::

    batch = perturb_inputs(batch)                    # 1. input perturbation, chained
    outputs = module.outputs(batch)                  # 2. forward, once
    losses = module.losses(batch, outputs)           # 3. per-sample (or per-token) losses
    objectives = losses + objective_terms(...)       # 4. objective terms, added by name
    w = Π weighting_sample_weights(Σ objectives)     # 5. sample weights, multiplied
    L_k = Σ_i w_i ℓ_ik / Σ_j w_j   (global sums)     # 6. normalized over the global batch
    c = objweight_coefficients(L)                    # 7. objective weighting, one owner
    if surgery:                                      #    gradient surgery (manual optimization):
        G = GradientSet([∇(c_k L_k)])                #      one gradient per objective, global
        d = surgery_combine(G) chained; p.grad = d   #      (paperhooks.gradients)
    else:
        backward(Σ_k c_k L_k)                        #    automatic optimization
    lifecycle_before_optimizer_step()                #    gradients final (reduced over ranks)
    optimizer.step()                                 #    optimizer_build, one owner
    reparam_after_step(); pruning_schedule →         # 8. after the step: reparameterization,
        pruning_scores → pruning_allocate → masks    #    pruning masks,
    lifecycle_step_end()                             #    step-end hooks

Set-up (``configure_model``): ``reparam_setup`` (parametrizations stack in recipe order),
pruning masks, ``lifecycle_setup``, ``metric_build``, then FSDP2 sharding. End of fit:
``lifecycle_fit_end`` (reverse order), then ``transform_after_fit`` (chained).

Importing :mod:`paperhooks` imports neither torch nor any plugin; the names below load on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "paperhooks.plugin",
    "Plugin": "paperhooks.plugin",
    "Paper": "paperhooks.plugin",
    "NoConfig": "paperhooks.plugin",
    "FAMILIES": "paperhooks.plugin",
    "StepContext": "paperhooks.context",
    "HookedModule": "paperhooks.module",
    "Hooks": "paperhooks.functional",
    "TaskModule": "paperhooks.taskmodule",
    "PaperhooksError": "paperhooks.errors",
    "RecipeError": "paperhooks.errors",
    "load_recipe": "paperhooks.recipe",
    "fit": "paperhooks.run",
}

__all__ = [*sorted(_LAZY), "dist"]


def __getattr__(name: str) -> Any:
    if name == "dist":
        return importlib.import_module("paperhooks.dist")
    if name not in _LAZY:
        raise AttributeError(f"module 'paperhooks' has no attribute {name!r}")
    attr = "load" if name == "load_recipe" else name
    return getattr(importlib.import_module(_LAZY[name]), attr)
