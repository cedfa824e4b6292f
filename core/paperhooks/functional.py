"""The families as plain calls, for users who keep their own ``training_step``.

``HookedModule`` is built on this class; calling it yourself gives the same results in
your own order::

    hooks = Hooks([LossReweighting(LossReweightingConfig(burnin_steps=0))], seed=0)

    def training_step(self, batch, batch_idx):
        hooks.begin_step(step=self.global_step, epoch=self.current_epoch)
        losses = F.cross_entropy(self(batch["input"]), batch["target"], reduction="none")
        return hooks.weighted_mean(losses, batch)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from paperhooks import dist
from paperhooks.context import StepContext
from paperhooks.gradients import Direction, Engine, write_grads
from paperhooks.manager import PluginSet
from paperhooks.plugin import Plugin

Batch = Mapping[str, torch.Tensor]


def summed(values: Any) -> torch.Tensor:
    """The sum of tensors, from the first one (``sum()`` would add it to 0 first: one more
    node in the graph)."""
    it = iter(values)
    out = next(it)
    for v in it:
        out = out + v
    return out


def per_sample(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-sample losses ``[B]`` from ``[B]`` or per-token ``[B, T]`` (mean over ``token_mask``)."""
    if losses.dim() == 1:
        return losses
    if losses.dim() != 2:
        raise ValueError(f"losses must have shape [B] or [B, T], got {tuple(losses.shape)}")
    mask = batch.get("token_mask")
    if mask is None:
        return losses.mean(dim=1)
    mask = mask.to(losses.dtype)
    return (losses * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class Hooks:
    """The active plugins and the step context, with one method per point of the step."""

    def __init__(
        self, plugins: Sequence[Plugin] | PluginSet = (), *, seed: int = 0, strategy: str = "single"
    ) -> None:
        self.plugins = plugins if isinstance(plugins, PluginSet) else PluginSet(plugins)
        self.ctx = StepContext(seed=seed, strategy=strategy)
        c = self.plugins.calls
        self._perturb = c["perturb_inputs"]
        self._objective = c["objective_terms"]
        self._weighting = c["weighting_sample_weights"]
        self._objweight = self.plugins.owner("objweight_coefficients")
        self._surgery = c["surgery_combine"]
        self._unchecked: list[tuple[str, torch.Tensor]] = []
        self.engine = Engine()

    @property
    def needs_manual_optimization(self) -> bool:
        return bool(self._surgery)

    def begin_step(self, step: int, epoch: int = 0, batch_idx: int = 0) -> StepContext:
        ctx = self.ctx
        ctx.step, ctx.epoch, ctx.batch_idx = step, epoch, batch_idx
        return ctx

    # -- before the forward pass ----------------------------------------------------------
    def perturb(self, batch: Batch, module: Any) -> Batch:
        for f in self._perturb:
            new = f(batch=batch, module=module, ctx=self.ctx)
            if new is not None:
                batch = new
        return batch

    # -- the loss ----------------------------------------------------------------------------
    def objectives(
        self, module: Any, batch: Batch, outputs: Mapping[str, torch.Tensor], base: Any
    ) -> dict[str, torch.Tensor]:
        """Per-sample objectives by name: the module's own ``base`` losses plus plugin terms."""
        if base is None:
            named: dict[str, torch.Tensor] = {}
        elif isinstance(base, Mapping):
            named = {k: per_sample(v, batch) for k, v in base.items()}
        else:
            named = {"loss": per_sample(base, batch)}
        for f in self._objective:
            terms = f(module=module, batch=batch, outputs=outputs, ctx=self.ctx)
            for k, v in (terms or {}).items():
                v = per_sample(v, batch)
                named[k] = named[k] + v if k in named else v
        if not named:
            raise ValueError(
                "no loss: the module returned no losses and no objective plugin added terms"
            )
        return named

    def sample_weights(
        self,
        losses: torch.Tensor,
        batch: Batch,
        outputs: Mapping[str, torch.Tensor] | None = None,
        module: Any = None,
    ) -> torch.Tensor | None:
        """Product of the plugins' weights for this rank's samples (not yet normalized).

        Each plugin's weights must be finite and non-negative. That is checked in :meth:`reduce`,
        on the device and together with the global sum (one all-reduce, one host sync per step
        instead of one per plugin); the error names the plugin, on every rank at once.
        """
        weights = None
        losses = losses.detach()
        outputs = outputs or {}
        self._unchecked = []
        for f in self._weighting:
            w = f(losses=losses, batch=batch, outputs=outputs, module=module, ctx=self.ctx)
            if w is None:
                continue
            name = f.plugin.name
            if not isinstance(w, torch.Tensor) or w.shape != losses.shape:
                raise ValueError(
                    f"plugin {name!r} returned invalid sample weights: need a tensor of shape "
                    f"{tuple(losses.shape)}, got {getattr(w, 'shape', type(w).__name__)}"
                )
            self._unchecked.append((name, (~(torch.isfinite(w) & (w >= 0))).sum()))
            weights = w if weights is None else weights * w
        return weights

    def reduce(
        self, objectives: Mapping[str, torch.Tensor], weights: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Scalar objectives. With weights: ``Σ_i w_i ℓ_i / Σ_j w_j`` over the global batch.

        The local value is multiplied by the world size, because DDP and FSDP average the
        gradients over ranks: the averaged gradient is then that of the global weighted mean.

        The global ``Σ_j w_j`` and the count of invalid weights of each plugin (from
        :meth:`sample_weights`) travel in one all-reduce and reach the host in one sync, so every
        rank raises the same error, before any gradient is computed.
        """
        if weights is None:
            return {k: v.mean() for k, v in objectives.items()}
        checks, self._unchecked = self._unchecked, []
        local = weights.detach().sum()  # in the weights' dtype, as the sum itself is taken
        packed = torch.stack(
            [local.to(torch.float64)] + [bad.to(torch.float64) for _, bad in checks]
        )
        packed = dist.all_reduce_sum(packed)
        total = packed[0].to(local.dtype)
        values = packed.tolist()  # the one host sync of the weighting path
        invalid = [name for (name, _), n in zip(checks, values[1:], strict=True) if n > 0]
        if invalid:
            raise ValueError(
                f"plugin {invalid[0]!r} returned invalid sample weights: need finite, non-negative "
                f"values, shape {tuple(weights.shape)}"
            )
        if not values[0] > 0 or values[0] == float("inf"):
            raise ValueError(
                f"sample weights sum to {values[0]} over the global batch; need a finite sum > 0"
            )
        scale = dist.world_size() / total
        return {k: (weights.to(v.dtype) * v).sum() * scale for k, v in objectives.items()}

    def coefficients(
        self, objectives: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | float]:
        coefs: dict[str, torch.Tensor | float] = dict.fromkeys(objectives, 1.0)
        if self._objweight is not None:
            given = self._objweight(objectives=objectives, ctx=self.ctx) or {}
            unknown = set(given) - set(objectives)
            if unknown:
                raise ValueError(
                    f"objective weights name unknown objectives {sorted(unknown)}; objectives: {sorted(objectives)}"
                )
            coefs.update(given)
        return coefs

    def total(self, objectives: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Σ_k c_k L_k``. A coefficient that is the number 1 multiplies nothing, and the sum
        starts from the first term: no ``1.0 · L`` or ``0 + L`` nodes in the graph."""
        coefs = self.coefficients(objectives)
        return summed(
            v if isinstance(c := coefs[k], int | float) and c == 1 else c * v
            for k, v in objectives.items()
        )

    def weighted_mean(self, losses: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The sample-weighted mean of ``losses`` over the global batch, as a scalar loss."""
        losses = per_sample(losses, batch)
        return self.reduce({"loss": losses}, self.sample_weights(losses, batch))["loss"]

    # -- gradient surgery -------------------------------------------------------------------
    @property
    def surgery_layout(self) -> str:
        """``"columns"`` when every surgery plugin works on column slices, else ``"full"``."""
        plugins = [f.plugin for f in self._surgery]
        return (
            "columns"
            if plugins and all(getattr(p, "columns_ok", False) for p in plugins)
            else "full"
        )

    def surgery_gradients(
        self, objectives: Mapping[str, torch.Tensor], module: torch.nn.Module
    ) -> Direction:
        """Write the surgery's update direction into ``p.grad`` (one gradient per objective first).

        ``objectives`` are the reduced scalar objectives of this rank (whose gradients, averaged
        over ranks, are the global ones). Returns the direction (its ``weights`` are the
        objective coefficients of the update when it is a linear combination).
        """
        coefs = self.coefficients(objectives)
        values = {k: coefs[k] * v for k, v in objectives.items()}
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        chosen = set(names)
        for f in self.plugins.calls["surgery_parameters"]:
            picked = f(module=module, names=names)
            if picked is None:
                continue
            unknown = set(picked) - set(names)
            if unknown:
                raise ValueError(
                    f"plugin {f.plugin.name!r} selected unknown parameters {sorted(unknown)[:5]} for gradient surgery"
                )
            chosen &= set(picked)
        if not chosen:
            raise ValueError(
                "gradient surgery: the plugins' surgery_parameters selected no parameter"
            )
        # the surgery parameters first, the rest after (in module order within each)
        named = [np for np in named if np[0] in chosen] + [
            np for np in named if np[0] not in chosen
        ]
        if self.ctx.strategy == "fsdp2":  # shards: FSDP2 reduces each backward pass itself
            return self.engine.run_sharded(values, named, chosen, self._surgery, self.ctx)  # type: ignore[arg-type]
        direction = self.engine.run(
            values, named, chosen, self._surgery, self.ctx, layout=self.surgery_layout
        )  # type: ignore[arg-type]
        write_grads(direction.vector, [p for _, p in named])
        return direction

    def log_items(self) -> dict[str, Any]:
        items = dict(self.ctx.logged)
        self.ctx.logged.clear()
        return items
