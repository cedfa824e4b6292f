"""Property checks of each hook family, on a plugin instance, outside training.

Each check calls the plugin's hooks as the core calls them, on small inputs, and raises
:class:`ConformanceError` naming the plugin and the property that failed:

- sample weighting: weights of the right shape, finite, non-negative, not all zero, for
  random, all-zero and all-equal losses and a batch of one; NaN losses raise an error that
  names the plugin (or, for plugins that declare they do not read the losses, the weights
  do not depend on them);
- gradient surgery: a finite result of a valid shape, the input left alone, and a descent
  direction for the summed objective, ``⟨d, Σ_k g_k⟩ ≥ 0``, on random conflicting gradients;
- pruning: the masks reach the sparsity the schedule asks for (or, without a schedule,
  the sparsities given);
- reparameterization: a parametrization is registered, forward and backward are finite;
- objective, objective weighting, optimizer, metric, input perturbation, post-training:
  the shape and finiteness of what the hook returns, plus one property each (see below).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from paperhooks.context import StepContext
from paperhooks.manager import PluginSet
from paperhooks.plugin import Plugin

#: the step at which hooks are called: late enough that any burn-in of a sensible config is over
STEP = 10_000


class ConformanceError(AssertionError):
    """A plugin does not have a property every plugin of its family must have."""


def fail(name: str, message: str) -> NoReturn:
    """Raise :class:`ConformanceError` ``"plugin 'name': message"``."""
    raise ConformanceError(f"plugin {name!r}: {message}")


def expect(ok: bool, plugin: Plugin, message: str) -> None:
    """Raise :class:`ConformanceError` ``"plugin 'name': message"`` unless ``ok``."""
    if not ok:
        raise ConformanceError(f"plugin {label(plugin)!r}: {message}")


def label(plugin: Plugin | type) -> str:
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return getattr(plugin, "name", "") or cls.__name__


def calls(plugin: Plugin, hook: str) -> list[Callable[..., Any]]:
    """The plugin's implementations of ``hook``, as the core would call them."""
    return PluginSet([plugin]).calls[hook]


def the_call(plugin: Plugin, hook: str) -> Callable[..., Any]:
    """The plugin's one implementation of ``hook``; a clear error when it has none."""
    found = calls(plugin, hook)
    expect(len(found) == 1, plugin, f"of family {plugin.family!r} does not implement {hook}")
    return found[0]


def context(step: int = STEP, max_steps: int | None = 2 * STEP, seed: int = 0) -> StepContext:
    return StepContext(seed=seed, step=step, max_steps=max_steps)


def tiny_model(seed: int = 0, sizes: Sequence[int] = (8, 16, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def tiny_module(seed: int = 0) -> Any:
    from paperhooks.module import HookedModule

    return HookedModule(tiny_model(seed))


def tiny_batch(
    n: int = 6, features: int = 8, classes: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input": torch.randn(n, features, generator=g),
        "target": torch.randint(classes, (n,), generator=g),
        "index": torch.arange(n),
    }


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# -- sample weighting --------------------------------------------------------------------------
def check_sample_weighting(plugin: Plugin, *, reads_losses: bool = True, step: int = STEP) -> None:
    """Weights are ``[B]``, finite, non-negative and not all zero; NaN losses are refused.

    :param reads_losses: ``False`` for plugins whose weights do not depend on the losses
        (class or group weights): then NaN losses need not raise, and the weights must stay
        the same when the losses change.
    """
    hook = the_call(plugin, "weighting_sample_weights")
    g = torch.Generator().manual_seed(0)
    cases = {
        "random losses": torch.rand(16, generator=g) * 3,
        "losses spread over 1e4": torch.rand(16, generator=g) * 1e4,
        "all-zero losses": torch.zeros(16),
        "all-equal losses": torch.full((16,), 2.3),
        "a batch of one sample": torch.tensor([0.7]),
    }
    module = tiny_module()

    def call(losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
        outputs = {k: v.detach() for k, v in module.outputs(batch).items()}
        return hook(losses=losses, batch=batch, outputs=outputs, module=module, ctx=context(step))

    acted = False
    for case, losses in cases.items():
        batch = tiny_batch(losses.numel())
        given = losses.clone()
        w = call(given, batch)
        expect(torch.equal(given, losses), plugin, f"changed the losses in place ({case})")
        if w is None:
            continue
        acted = True
        expect(
            isinstance(w, torch.Tensor) and w.shape == losses.shape,
            plugin,
            f"weights must be a tensor of shape {tuple(losses.shape)}, got {getattr(w, 'shape', type(w))} ({case})",
        )
        expect(_finite(w), plugin, f"weights are not finite ({case}): {w.tolist()}")
        expect(bool((w >= 0).all()), plugin, f"weights are negative ({case}): {w.tolist()}")
        expect(bool(w.sum() > 0), plugin, f"weights are all zero ({case})")
    expect(
        acted,
        plugin,
        f"returned no weights at step {step}; give a plugin_config under which it acts",
    )

    losses = cases["random losses"]
    bad = losses.clone()
    bad[3] = math.nan
    batch = tiny_batch(16)
    if reads_losses:
        try:
            call(bad, batch)
        except Exception as e:  # noqa: BLE001 - any error type, as long as it names the plugin
            names = {label(plugin), type(plugin).__name__}
            expect(
                any(n and n in str(e) for n in names),
                plugin,
                f"NaN losses raised {type(e).__name__}({e}), which does not name the plugin",
            )
        else:
            expect(False, plugin, "NaN losses gave no error; raise one that names the plugin")
    else:
        a, b = call(losses, batch), call(2 * losses + 1, batch)
        expect(
            a is not None and b is not None and torch.equal(a, b),
            plugin,
            "declares reads_losses=False, but its weights change with the losses",
        )


# -- gradient surgery ----------------------------------------------------------------------------
def conflicting_gradients(k: int, p: int, seed: int) -> torch.Tensor:
    """``[K, P]`` gradients where every pair after the first conflicts with the first."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=g)
    rows = [base]
    for _ in range(1, k):
        rows.append(-0.6 * base + torch.randn(p, generator=g))
    return torch.stack(rows) * torch.rand(k, 1, generator=g).add(0.1) * 3


def check_gradient_surgery(
    plugin: Plugin, *, seeds: Sequence[int] = range(5), step: int = STEP
) -> None:
    """Finite, valid result type, input untouched, and ``⟨d, Σ_k g_k⟩ ≥ 0`` for the direction d."""
    from paperhooks.gradients import Block, Direction, GradientSet

    hook = the_call(plugin, "surgery_combine")
    p = 12
    cases = []
    for seed in seeds:
        for k in (2, 3):
            cases.append(
                (f"{k} conflicting gradients (seed {seed})", conflicting_gradients(k, p, seed))
            )
    aligned = torch.randn(p, generator=torch.Generator().manual_seed(99))
    cases.append(("2 aligned gradients", torch.stack([aligned, 2 * aligned])))
    cases.append(("a zero gradient", torch.stack([aligned, torch.zeros(p)])))
    cases.append(("one objective", aligned.unsqueeze(0)))
    for case, G in cases:
        given = G.clone()
        names = [f"objective{i}" for i in range(G.shape[0])]
        losses = torch.linspace(1.0, 2.0, G.shape[0], dtype=torch.float64)
        gset = GradientSet(given, names, losses, blocks=[Block("weight", 0, p, torch.Size([3, 4]))])
        out = hook(grads=gset, ctx=context(step))
        expect(torch.equal(given, G), plugin, f"changed its input gradients in place ({case})")
        if out is None:
            d = G.sum(dim=0)
        elif isinstance(out, Direction):
            expect(
                out.vector.shape == G.shape[1:],
                plugin,
                f"returned a direction of shape {tuple(out.vector.shape)}, "
                f"need {tuple(G.shape[1:])} ({case})",
            )
            d = out.vector
        else:
            expect(
                isinstance(out, GradientSet),
                plugin,
                f"must return a GradientSet, a Direction or None, got {type(out).__name__} ({case})",
            )
            d = out.rows.sum(dim=0)
        expect(_finite(d), plugin, f"the direction is not finite ({case})")
        total = G.sum(dim=0)
        inner = torch.dot(d.double(), total.double()).item()
        scale = d.double().norm().item() * total.double().norm().item()
        expect(
            inner >= -1e-6 * max(scale, 1e-12),
            plugin,
            f"the direction is not a descent direction for Σ_k g_k: ⟨d, Σ g⟩ = {inner:.4g} < 0 ({case})",
        )


# -- pruning -------------------------------------------------------------------------------------------
def check_pruning(
    plugin: Plugin, *, sparsities: Sequence[float] = (0.25, 0.5, 0.9), max_steps: int = 20
) -> None:
    """The masks the plugin's schedule, criterion and allocation give reach the asked sparsity.

    With a schedule, the sparsity asked is its last value over ``max_steps`` steps, which must
    be positive (otherwise the check proves nothing); without one, each of ``sparsities``.
    """
    from paperhooks import pruning

    pset = PluginSet([plugin])
    schedule = pset.owner("pruning_schedule")
    scorer, allocator = pset.owner("pruning_scores"), pset.owner("pruning_allocate")
    expect(any((schedule, scorer, allocator)), plugin, "implements no pruning hook")
    targets = list(sparsities)
    if schedule is not None:
        asked = []
        for step in range(max_steps + 1):
            s = schedule(ctx=context(step, max_steps))
            if s is not None:
                expect(
                    isinstance(s, int | float) and 0 <= s < 1,
                    plugin,
                    f"schedule must give a sparsity in [0, 1) or None, got {s!r} at step {step}",
                )
                asked.append(float(s))
        expect(
            bool(asked) and asked[-1] > 0,
            plugin,
            f"the schedule never asks for a positive sparsity over {max_steps} steps; "
            "give a plugin_config under which it prunes",
        )
        targets = [asked[-1]]
    module = tiny_module()
    layers = pruning.prunable(module.model)
    params = {k: m.weight for k, m in layers.items()}
    total = sum(p.numel() for p in params.values())
    ctx = context(max_steps, max_steps)
    for s in targets:
        scores = (
            scorer(params=params, module=module, ctx=ctx) if scorer else None
        ) or pruning.magnitude_scores(params)
        expect(
            set(scores) == set(params) and all(scores[k].shape == params[k].shape for k in params),
            plugin,
            "scores must have one tensor per prunable weight, of its shape",
        )
        expect(all(_finite(v) for v in scores.values()), plugin, "scores are not finite")
        keep = (
            allocator(scores=scores, sparsity=s, ctx=ctx) if allocator else None
        ) or pruning.global_allocation(scores, s)
        expect(
            set(keep) == set(params)
            and all(
                keep[k].shape == params[k].shape and keep[k].dtype == torch.bool for k in params
            ),
            plugin,
            "masks must be one boolean tensor per prunable weight, of its shape",
        )
        reached = 1.0 - sum(int(v.sum()) for v in keep.values()) / total
        expect(
            abs(reached - s) <= len(params) / total + 1e-9,
            plugin,
            f"masks reach sparsity {reached:.4f}, asked {s:.4f}",
        )


# -- reparameterization ------------------------------------------------------------------------------
def check_reparameterization(plugin: Plugin) -> None:
    """A parametrization is registered; forward, backward and the after-step update are finite."""
    from torch.nn.utils import parametrize

    module = tiny_module()
    ctx = context(0)
    for f in calls(plugin, "reparam_setup"):
        f(module=module, ctx=ctx)
    model = module.model
    registered = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    expect(bool(registered), plugin, "reparam_setup registered no parametrization on module.model")
    x = tiny_batch()["input"]
    y = model(x)
    expect(
        y.shape == (x.shape[0], 4) and _finite(y),
        plugin,
        "the reparameterized model's output is not finite",
    )
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    expect(
        bool(grads) and all(g is not None and _finite(g) for g in grads),
        plugin,
        "gradients of the reparameterized model are missing or not finite",
    )
    for f in calls(plugin, "reparam_after_step"):
        f(module=module, ctx=context(1))
    expect(_finite(model(x)), plugin, "the output is not finite after reparam_after_step")


# -- objective -------------------------------------------------------------------------------------------
def check_objective(
    plugin: Plugin, *, step: int = STEP, task: Mapping[str, Any] | None = None
) -> None:
    """Named per-sample terms, ``[B]`` or ``[B, T]``, finite, with finite gradients.

    ``task`` (a :func:`~paperhooks.testing.metadata.tiny_recipe` task such as
    ``PREFERENCE_TASK``) checks the terms on that task's module and batch instead of the MLP's.
    """
    module, batch = (
        _task_module_and_batch(task) if task is not None else (tiny_module(), tiny_batch())
    )
    outputs = module.outputs(batch)
    acted = False
    for f in calls(plugin, "objective_terms"):
        terms = f(module=module, batch=batch, outputs=outputs, ctx=context(step))
        if terms is None:
            continue
        acted = True
        expect(
            isinstance(terms, Mapping) and all(isinstance(k, str) and k for k in terms),
            plugin,
            f"objective_terms must return a mapping from names to tensors, got {type(terms).__name__}",
        )
        for k, v in terms.items():
            n = next(iter(batch.values())).shape[0]
            expect(
                isinstance(v, torch.Tensor) and v.dim() in (1, 2) and v.shape[0] == n,
                plugin,
                f"term {k!r} must have shape [B] or [B, T] with B = {n}, got {getattr(v, 'shape', type(v))}",
            )
            expect(_finite(v), plugin, f"term {k!r} is not finite")
            if v.requires_grad:
                v.sum().backward(retain_graph=True)
    expect(acted, plugin, f"returned no terms at step {step}")
    expect(
        all(p.grad is None or _finite(p.grad) for p in module.parameters()),
        plugin,
        "gradients of the terms are not finite",
    )


# -- objective weighting ---------------------------------------------------------------------------
def _task_module_and_batch(task: Mapping[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The preference task's module (its model and objective, no plugins) and 8 training rows."""
    from paperhooks.preference import PreferenceObjective
    from paperhooks.testing.preference import preference_batch, preference_module

    data, model = dict(task["data"]), dict(task["model"])
    if not str(data.get("name", "")).endswith("preferences"):
        raise ValueError(
            f"check_objective: task must be a preference task, got data {data.get('name')!r}"
        )
    data.pop("batch_size", None)
    dm, batch = preference_batch(data.pop("name"), rows=8, **data)
    objective = PreferenceObjective(**dict(task.get("objective") or {}))
    return preference_module(dm, model.pop("name"), model, objective=objective), batch


def check_objective_weighting(plugin: Plugin, *, step: int = STEP) -> None:
    """Coefficients name known objectives only, and are finite and non-negative scalars."""
    hook = the_call(plugin, "objweight_coefficients")
    for case, objectives in {
        "two objectives": {"loss": torch.tensor(0.7), "aux": torch.tensor(2.5)},
        "one objective": {"loss": torch.tensor(1.3)},
        "a zero objective": {"loss": torch.tensor(0.0), "aux": torch.tensor(1.0)},
    }.items():
        c = hook(objectives=dict(objectives), ctx=context(step))
        if c is None:
            continue
        expect(
            isinstance(c, Mapping) and set(c) <= set(objectives),
            plugin,
            f"coefficients must name objectives among {sorted(objectives)}, got {c!r} ({case})",
        )
        for k, v in c.items():
            value = torch.as_tensor(v)
            expect(
                value.numel() == 1 and _finite(value) and bool(value >= 0),
                plugin,
                f"coefficient {k!r} must be a finite scalar >= 0, got {v!r} ({case})",
            )


# -- optimizer -------------------------------------------------------------------------------------------
def check_optimizer(plugin: Plugin, *, lr: float = 0.01, steps: int = 20) -> None:
    """A ``torch.optim.Optimizer`` that decreases a convex quadratic and resumes exactly."""

    def build(w: nn.Parameter) -> torch.optim.Optimizer:
        return the_call(plugin, "optimizer_build")(
            param_groups=[{"params": [w], "lr": lr, "weight_decay": 0.0}], ctx=context(0)
        )

    target = torch.randn(10, generator=torch.Generator().manual_seed(0))

    def loss(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (w - target).square().sum()

    def run(opt: torch.optim.Optimizer, w: nn.Parameter, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            loss(w).backward()
            opt.step()

    w = nn.Parameter(torch.zeros(10))
    opt = build(w)
    expect(
        isinstance(opt, torch.optim.Optimizer),
        plugin,
        f"optimizer_build must return a torch.optim.Optimizer, got {type(opt).__name__}",
    )
    start = loss(w).item()
    run(opt, w, steps)
    end = loss(w).item()
    expect(
        math.isfinite(end) and end < start,
        plugin,
        f"{steps} steps at lr {lr} did not decrease ½‖w − w*‖²: {start:.4g} → {end:.4g}",
    )
    # resume: a new optimizer loading the state continues exactly as the original
    w2 = nn.Parameter(w.detach().clone())
    opt2 = build(w2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(opt, w, 3)
    run(opt2, w2, 3)
    expect(
        torch.equal(w.detach(), w2.detach()),
        plugin,
        "an optimizer loaded from state_dict does not continue identically",
    )


# -- metric ---------------------------------------------------------------------------------------------
def check_metric(plugin: Plugin) -> None:
    """torchmetrics metrics with valid names, whose update/compute/reset give finite values."""
    import torchmetrics

    module = tiny_module()
    got: dict[str, Any] = {}
    for f in calls(plugin, "metric_build"):
        got.update(f(module=module, ctx=context(0)) or {})
    expect(bool(got), plugin, "metric_build returned no metrics")
    for name, metric in got.items():
        expect(
            isinstance(name, str) and name and "." not in name,
            plugin,
            f"metric name {name!r} must be non-empty, without '.'",
        )
        expect(
            isinstance(metric, torchmetrics.Metric),
            plugin,
            f"metric {name!r} is not a torchmetrics.Metric",
        )
        for seed in (0, 1):
            batch = tiny_batch(seed=seed)
            metric.update(module.outputs(batch), batch)
        values = metric.compute()
        flat = values.values() if isinstance(values, Mapping) else [values]
        expect(
            all(_finite(torch.as_tensor(v)) for v in flat),
            plugin,
            f"metric {name!r} computed a non-finite value",
        )
        metric.reset()


# -- input perturbation ---------------------------------------------------------------------------
def check_input_perturbation(plugin: Plugin, *, step: int = STEP) -> None:
    """Same keys, shapes and dtypes; finite inputs; targets and the batch left alone; no
    gradient leaked into the parameters."""
    module = tiny_module()
    batch = tiny_batch()
    before = {k: v.clone() for k, v in batch.items()}
    acted = False
    for f in calls(plugin, "perturb_inputs"):
        new = f(batch=batch, module=module, ctx=context(step))
        if new is None:
            continue
        acted = True
        expect(
            isinstance(new, Mapping) and set(batch) <= set(new),
            plugin,
            "the perturbed batch lost keys",
        )
        x = new["input"]
        expect(
            x.shape == batch["input"].shape and x.dtype == batch["input"].dtype and _finite(x),
            plugin,
            "perturbed inputs must be finite, with the shape and dtype of the inputs",
        )
        expect(torch.equal(new["target"], before["target"]), plugin, "changed the targets")
    expect(
        acted,
        plugin,
        f"returned no perturbed batch at step {step}; give a plugin_config under which it acts",
    )
    expect(
        all(torch.equal(batch[k], before[k]) for k in before),
        plugin,
        "changed the original batch in place",
    )
    expect(
        all(p.grad is None or not bool(p.grad.any()) for p in module.parameters()),
        plugin,
        "left gradients in the parameters' .grad; use torch.autograd.grad",
    )


# -- post-training ------------------------------------------------------------------------------------
def check_post_training(plugin: Plugin) -> None:
    """The transformed model is finite, and the transform is deterministic (same on every rank)."""
    from paperhooks.module import HookedModule
    from paperhooks.tasks import DigitsConfig, MLPConfig, build_datamodule, build_model

    dm = build_datamodule("digits", DigitsConfig(batch_size=64), 0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        module = HookedModule(build_model("mlp", MLPConfig(hidden=(16,)), dm.info))
        torch.manual_seed(1)
        for f in calls(plugin, "transform_after_fit"):
            f(module=module, datamodule=dm, ctx=context(0))
        batch = next(iter(dm.val_dataloader()))
        expect(
            _finite(module.model(batch["input"])),
            plugin,
            "the transformed model's output is not finite",
        )
        states.append(module.model.state_dict())
    a, b = states
    expect(
        sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
        plugin,
        "two runs of the transform on the same model gave different weights",
    )


FAMILY_CHECKS: dict[str, Callable[..., None]] = {
    "sample-weighting": check_sample_weighting,
    "objective": check_objective,
    "objective-weighting": check_objective_weighting,
    "gradient-surgery": check_gradient_surgery,
    "reparameterization": check_reparameterization,
    "pruning": check_pruning,
    "optimizer": check_optimizer,
    "metric": check_metric,
    "input-perturbation": check_input_perturbation,
    "post-training": check_post_training,
}
"""Family name → its property check (each takes the plugin instance and keyword options)."""

__all__ = [
    "FAMILY_CHECKS",
    "STEP",
    "ConformanceError",
    "check_gradient_surgery",
    "check_input_perturbation",
    "check_metric",
    "check_objective",
    "check_objective_weighting",
    "check_optimizer",
    "check_post_training",
    "check_pruning",
    "check_reparameterization",
    "check_sample_weighting",
    "conflicting_gradients",
    "expect",
    "fail",
]
