"""``HookedModule``: a LightningModule that runs the hook families in one fixed order.

Subclass it and implement ``forward`` (and ``losses`` if cross-entropy on ``logits`` is not
your loss); the step order is in the package docstring of :mod:`paperhooks`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paperhooks import dist, pruning
from paperhooks.errors import UnusedParameterError
from paperhooks.functional import Hooks, summed
from paperhooks.gradients import write_grads
from paperhooks.plugin import Plugin
from paperhooks.recipe import OptimizerSection

CKPT_KEY = "paperhooks"


class HookedModule(L.LightningModule):
    """A LightningModule whose training step is assembled from plugins.

    :param model: the network (``self.model``); ``forward`` calls it.
    :param plugins: plugin instances, in the order they run.
    :param optimizer: the built-in optimizer settings (ignored when a plugin builds it).
    :param seed: seeds the step generators plugins draw shared randomness from.
    :param strategy: strategy kind (``single``, ``ddp``, ``fsdp2``...), for plugins' benefit.
    :param recipe: the resolved recipe and plugin versions, stored in checkpoints.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        plugins: Sequence[Plugin] = (),
        *,
        optimizer: OptimizerSection | None = None,
        seed: int = 0,
        strategy: str = "single",
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.hooks = Hooks(plugins, seed=seed, strategy=strategy)
        self.optimizer_config = optimizer or OptimizerSection()
        self.recipe = dict(recipe or {})
        self.automatic_optimization = not self.hooks.needs_manual_optimization
        self.masks: dict[str, pruning.Mask] = {}
        self.sparsity = 0.0
        self._layer_sparsity: dict[str, float] | None = None
        self._prunable: dict[str, torch.nn.Module] | None = None
        self._configured = False
        self._replicated: list[nn.Parameter] = []
        #: child module name → the plugin that added it in ``lifecycle_setup``
        self._added_by: dict[str, str] = {}
        self._named_params: list[tuple[str, nn.Parameter]] | None = None  # for the DDP check
        self._pending_rng: dict[str, Any] | None = None
        self._sync_off: Any = None
        self._rng_at_step_start: torch.Tensor | None = None
        self._step_at_start = 0
        #: gradient clipping under manual optimization (Lightning clips only automatic)
        self.manual_clip: float | None = None

    # -- the user's contract ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def outputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model outputs for a batch; computed once per step and given to objective plugins."""
        return {"logits": self(batch["input"])}

    def losses(self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> Any:
        """Per-sample ``[B]`` (or per-token ``[B, T]``) losses, or a mapping naming several."""
        return F.cross_entropy(outputs["logits"], batch["target"], reduction="none")

    # -- set-up -----------------------------------------------------------------------------------
    @property
    def plugins(self) -> list[Plugin]:
        return self.hooks.plugins.plugins

    def configure_model(self) -> None:
        if self._configured:
            return
        self._configured = True
        ctx = self.hooks.ctx
        for f in self.hooks.plugins.calls["reparam_setup"]:
            f(module=self, ctx=ctx)
        if self.hooks.plugins.has("pruning_schedule"):
            self.masks = pruning.add_masks(self.model)
        for f in self.hooks.plugins.calls["lifecycle_setup"]:
            known = {name for name, _ in self.named_children()}
            f(module=self, ctx=ctx)
            for name, _ in self.named_children():
                if name not in known:
                    self._added_by[name] = f.plugin.name or type(f.plugin).__name__
        #: trainable modules plugins added beside the model (a discriminator, a critic). Under
        #: FSDP2 they stay whole on every rank (replicated, as DDP keeps every parameter):
        #: rank 0's values are broadcast here and their gradients averaged before each step.
        self._replicated = [
            p
            for name, m in self.named_children()
            if name in self._added_by
            for p in m.parameters()
            if p.requires_grad
        ]
        if ctx.strategy == "fsdp2":
            for p in self._replicated:
                dist.broadcast(p.data)
        metrics: dict[str, nn.Module] = {}
        for f in self.hooks.plugins.calls["metric_build"]:
            for name, metric in (f(module=self, ctx=ctx) or {}).items():
                if name in metrics:
                    raise ValueError(f"two plugins define the metric {name!r}")
                metrics[name] = metric
        self.plugin_metrics = nn.ModuleDict(metrics)
        from paperhooks.reparam import trainable_parameters

        self.trainable_parameters = trainable_parameters(self)  # before sharding: whole tensors
        if ctx.strategy == "fsdp2":
            self._shard()

    def _shard(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        for m in self.model.modules():
            if (
                m is not self.model
                and any(True for _ in m.parameters(recurse=False))
                and not list(m.children())
            ):
                fully_shard(m, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def on_fit_start(self) -> None:
        ctx = self.hooks.ctx
        t = self.trainer
        ctx.max_steps = t.max_steps if t.max_steps and t.max_steps > 0 else None
        if ctx.max_steps is None and t.max_epochs:
            ctx.max_steps = int(t.estimated_stepping_batches)
        ctx.max_epochs = t.max_epochs
        wrapped = getattr(t.strategy, "model", None)
        ctx._no_sync = getattr(wrapped, "no_sync", None)  # DDP's; None on one process and FSDP2
        if not self.automatic_optimization and ctx.strategy == "ddp":
            # Gradient surgery computes per-objective gradients with autograd.grad and averages
            # them in one all-reduce of its own, so DDP's reducer must stay out of the way.
            self._sync_off = t.strategy.model.no_sync()
            self._sync_off.__enter__()

    def on_fit_end(self) -> None:
        if self._sync_off is not None:
            self._sync_off.__exit__(None, None, None)
            self._sync_off = None
        ctx = self.hooks.ctx
        for f in self.hooks.plugins.calls["lifecycle_fit_end"]:
            f(module=self, ctx=ctx)
        dm = getattr(self.trainer, "datamodule", None)
        for f in self.hooks.plugins.calls["transform_after_fit"]:
            f(module=self, datamodule=dm, ctx=ctx)

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            _set_rng(self._pending_rng)
            self._pending_rng = None
        self.hooks.ctx.steps_per_epoch = _steps_per_epoch(self.trainer)  # the data is set up by now
        if self.masks and self.global_step == 0:
            # the schedule's step 0: before the first update (a one-shot prune of a trained model)
            self.hooks.begin_step(0, self.current_epoch, 0)
            self._prune(self.hooks.ctx)

    # -- the step ---------------------------------------------------------------------------------
    def training_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        # An exception mid-step saves torch's RNG as it was here, so a resume repeats the step
        # exactly. numpy's and Python's states are read when the checkpoint is written: nothing in
        # a step draws from them (data loading runs between steps), and reading them costs
        # ~0.1 ms, against ~2 µs for torch's.
        self._rng_at_step_start = torch.get_rng_state()
        hooks = self.hooks
        self._step_at_start = self.global_step
        hooks.begin_step(self.global_step, self.current_epoch, batch_idx)
        hooks.ctx.logging_step = self._logging_step()
        batch = hooks.perturb(batch, self)  # 1. input perturbation
        outputs = self.outputs(batch)  # 2. forward
        base = (
            None if hooks.plugins.replaces_task_loss else self.losses(batch, outputs)
        )  # 3. losses
        objectives = hooks.objectives(self, batch, outputs, base)  # 4. objective terms
        weights = (  # 5. weights, from the per-sample total of the objectives
            hooks.sample_weights(summed(objectives.values()), batch, outputs, self)
            if hooks._weighting
            else None
        )
        reduced = hooks.reduce(objectives, weights)  # 6. global normalization
        self._log_step(reduced, outputs, batch)
        if self.automatic_optimization:
            return hooks.total(reduced)  # 7. objective weighting; Lightning runs backward
        opt = self.optimizers()
        opt.zero_grad()
        hooks.surgery_gradients(reduced, self)  # 7'. surgery (averages replicated gradients)
        self._before_optimizer_step()
        if self.manual_clip:
            self.configure_gradient_clipping(opt, self.manual_clip, "norm")
        opt.step()
        self._after_optimizer_step()
        return None

    def on_after_backward(self) -> None:
        self._check_ddp_gradients()

    def _check_ddp_gradients(self) -> None:
        """Under DDP without ``trainer.find_unused_parameters``, a trainable parameter that got
        no gradient on this rank makes DDP wait forever: the other ranks block in the all-reduce
        of its bucket, which this rank never starts. Raise here, on the rank that lacks it,
        naming the parameters, their plugin and the recipe key, instead of hanging. This rank's
        exit then ends the others' wait. One loop over a list of the parameters, once per step."""
        wrapped = getattr(self.trainer.strategy, "model", None)
        if (
            self.hooks.ctx.strategy != "ddp"
            or not self.automatic_optimization
            or not getattr(wrapped, "require_backward_grad_sync", False)
            or getattr(wrapped, "find_unused_parameters", True)
        ):
            return
        if self._named_params is None:  # walking the module tree each step costs ~0.4 ms for a
            self._named_params = list(self.named_parameters())  # 12-layer GPT-2, the list ~30 µs
        missing = [n for n, p in self._named_params if p.requires_grad and p.grad is None]
        if not missing:
            return
        owners = sorted(
            {self._added_by[n.split(".")[0]] for n in missing if n.split(".")[0] in self._added_by}
        )
        by = f" (added by plugin {', '.join(repr(o) for o in owners)})" if owners else ""
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise UnusedParameterError(
            f"under strategy 'ddp', parameter(s) {shown}{by} got no gradient on rank "
            f"{self.global_rank} at step {self.global_step}. DDP would wait for it forever on "
            "the other ranks. Set trainer.find_unused_parameters: true in the recipe when a "
            "module is not used on every rank in every step (it costs one extra pass over the "
            "graph per step), or freeze the parameter (requires_grad=False) if it never trains."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.automatic_optimization:  # under surgery the engine averages them itself
            self._average_replicated_grads()
            self._before_optimizer_step()

    def _before_optimizer_step(self) -> None:
        """``lifecycle_before_optimizer_step``: the gradients are final, clipping and the step
        come next (Lightning clips after this hook)."""
        calls = self.hooks.plugins.calls["lifecycle_before_optimizer_step"]
        if calls:
            ctx = self.hooks.ctx
            for f in calls:
                f(module=self, ctx=ctx)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except under FSDP2 with plugin-added modules: their gradients are
        plain tensors beside the model's DTensors, which ``clip_grad_norm_`` cannot take in
        one call. There the norm is the norm of both kinds together (the replicated gradients,
        already averaged and equal on every rank, counted once), as one process computes it."""
        if (
            self.hooks.ctx.strategy == "fsdp2"
            and self._replicated
            and gradient_clip_val
            and (gradient_clip_algorithm or "norm") == "norm"
        ):
            _clip_mixed_grad_norm_(optimizer, float(gradient_clip_val))
            return
        if self.automatic_optimization:
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        elif gradient_clip_val:  # manual optimization: the trainer holds no clip value
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _average_replicated_grads(self) -> None:
        """Under FSDP2, the mean over ranks of the gradients of plugin-added modules (FSDP2
        reduce-scatters only the model's): one all-reduce of their concatenation."""
        if self.hooks.ctx.strategy != "fsdp2" or not self._replicated or not dist.is_distributed():
            return
        params = self._replicated
        # A parameter may have a gradient on some ranks and none on others (a module called
        # on some ranks' rows only): every rank sends every block (zeros where it has none)
        # and a flag per parameter, so all ranks reduce the same buffer, as DDP does with
        # unused parameters. Only a parameter that no rank used keeps no gradient.
        missing = [p.grad is None for p in params]
        blocks = [
            torch.zeros_like(p) if m else p.grad for p, m in zip(params, missing, strict=True)
        ]
        flags = torch.tensor(
            [float(not m) for m in missing], dtype=blocks[0].dtype, device=blocks[0].device
        )
        flat = dist.all_reduce_sum(torch.cat([b.reshape(-1) for b in blocks] + [flags]))
        write_grads(flat[: -len(params)] / dist.world_size(), params)
        if any(missing):  # only a rank without some gradient reads the flags back
            for p, used in zip(params, flat[-len(params) :].tolist(), strict=True):
                if used == 0:
                    p.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._after_optimizer_step()

    def _after_optimizer_step(self) -> None:
        """8. reparameterization updates, pruning, then lifecycle step-end hooks."""
        self._rng_at_step_start = None
        ctx = self.hooks.ctx
        # steps completed, this one included (Lightning counts it only after this hook returns)
        ctx.step = self._step_at_start + 1
        calls = self.hooks.plugins.calls
        for f in calls["reparam_after_step"]:
            f(module=self, ctx=ctx)
        if self.masks:
            if (
                self._prunable is None
            ):  # the layer objects stay; their parameters are looked up each time
                self._prunable = pruning.prunable(self.model)
            pruning.zero_pruned(
                self.model, self.masks, self._prunable
            )  # momentum, weight decay cannot revive them
            self._prune(ctx)
            self._log_sparsity(ctx)
        for f in calls["lifecycle_step_end"]:
            f(module=self, ctx=ctx)
        # Lightning writes on_step values on logging steps only: values logged on other steps
        # wait in ctx.logged (the latest per name) and go out with the next logging step, so a
        # one-off value (an allocation, a mask change) is written rather than lost
        if ctx.logged and ctx.logging_step:
            self.log_dict(self.hooks.log_items(), on_step=True, on_epoch=False)

    @torch.no_grad()
    def _prune(self, ctx: Any) -> None:
        schedule = self.hooks.plugins.owner("pruning_schedule")
        if schedule is None:  # masks carried over from an earlier stage: kept as they are
            return
        target = schedule(ctx=ctx)
        if target is None:
            return
        if (
            isinstance(target, bool)
            or not isinstance(target, int | float)
            or not 0.0 <= target < 1.0
        ):
            raise ValueError(
                f"plugin {schedule.plugin.name!r}: pruning_schedule returned {target!r} at step {ctx.step}; "
                "a sparsity must be a number in [0, 1)"
            )
        if target == self.sparsity:
            return
        sharded = pruning.sharded_run(ctx)
        params = pruning.local_weights(self.model, self.masks)  # under FSDP2: this rank's rows
        rows = pruning.local_rows(self.model, self.masks)
        scorer = self.hooks.plugins.owner("pruning_scores")
        scores = (
            scorer(params=params, module=self, ctx=ctx) if scorer else None
        ) or pruning.magnitude_scores(params)
        # pruned weights stay pruned: they rank below every weight still in
        scores = {
            k: torch.where(
                m.mask[rows[k]],
                scores[k].float() if not scores[k].is_floating_point() else scores[k],
                -torch.inf,
            )
            for k, m in self.masks.items()
        }
        allocator = self.hooks.plugins.owner("pruning_allocate")
        keep = (
            allocator(scores=scores, sparsity=target, ctx=ctx) if allocator else None
        ) or pruning.global_allocation(scores, target, sharded=sharded)
        bad = [
            k
            for k in self.masks
            if k not in keep or keep[k].shape != scores[k].shape or keep[k].dtype != torch.bool
        ]
        if bad:
            raise ValueError(
                f"plugin {allocator.plugin.name if allocator else '(core)'!r}: pruning_allocate must return one boolean mask per prunable "
                f"weight, of its shape; wrong or missing for {bad[:5]}"
            )
        pruning.set_masks(self.model, self.masks, keep)
        pruning.zero_pruned(self.model, self.masks)
        self.sparsity = pruning.sparsity_of(self.masks)
        self._layer_sparsity = None

    def _log_sparsity(self, ctx: Any) -> None:
        """``pruning/sparsity`` and ``pruning/sparsity/<layer>``: on the steps the trainer writes
        logs, and on every step whose masks changed (so the last value logged is always the
        current one). Counted only when the masks change."""
        changed = self._layer_sparsity is None
        if not changed and not ctx.logging_step:
            return
        if changed:
            self._layer_sparsity = pruning.layer_sparsity(self.masks)
        ctx.log("pruning/sparsity", self.sparsity)
        for k, v in self._layer_sparsity.items():
            ctx.log(f"pruning/sparsity/{k}", v)

    def _logging_step(self) -> bool:
        """Whether the trainer writes this step's logs (Lightning's own test; True without a
        trainer), or this is the fit's last step (so ``trainer.callback_metrics``, and the run's
        summary, end with every plugin's last values, also in a run shorter than
        ``log_every_n_steps``)."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if bool(getattr(connector, "should_update_logs", True)):
            return True
        max_steps = getattr(trainer, "max_steps", -1)
        if max_steps is not None and max_steps > 0 and self.global_step + 1 >= max_steps:
            return True
        max_epochs = getattr(trainer, "max_epochs", None)
        return bool(
            max_epochs is not None
            and max_epochs > 0
            and trainer.current_epoch + 1 >= max_epochs
            and getattr(trainer, "is_last_batch", False)
        )

    @property
    def _multi(self) -> bool:
        # The weighted local objective is this rank's share × world size: its mean over ranks
        # is the global loss, so the logged value is reduced when there are several ranks.
        return self._trainer is not None and self.trainer.world_size > 1

    def _log_step(
        self, reduced: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor], batch: Any
    ) -> None:
        for k, v in reduced.items():
            self.log(
                f"train/{k}",
                v.detach(),
                on_step=True,
                on_epoch=True,
                prog_bar=(k == "loss"),
                sync_dist=self._multi,
            )

    def on_train_epoch_end(self) -> None:
        for f in self.hooks.plugins.calls["lifecycle_epoch_end"]:
            f(module=self, ctx=self.hooks.ctx)

    # -- optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_config
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if self.hooks.ctx.strategy == "fsdp2" and self._replicated:
            # sharded (DTensor) and replicated (plain) parameters in separate groups, with the
            # same settings: an optimizer's multi-tensor kernels take one kind per group
            mine = {id(p) for p in self._replicated}
            groups = [
                {**groups[0], "params": [p for p in params if id(p) not in mine]},
                {**groups[0], "params": [p for p in params if id(p) in mine]},
            ]
        owner = self.hooks.plugins.owner("optimizer_build")
        if owner is not None:
            opt = owner(param_groups=groups, ctx=self.hooks.ctx)
        elif cfg.name == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        elif cfg.name == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        if cfg.scheduler == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {
            "recipe": self.recipe,
            "plugins": self.hooks.plugins.state_dict(),
            "sparsity": self.sparsity,
            "rng": _rng_to_plain(_get_rng_raw(self._rng_at_step_start)),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            return
        self.hooks.plugins.load_state_dict(state["plugins"])
        self.sparsity = state["sparsity"]
        self._pending_rng = state["rng"]


def _steps_per_epoch(trainer: L.Trainer) -> int | None:
    """Optimizer steps per epoch as Lightning takes them: the last, partial accumulation of an
    epoch steps too (``estimated_stepping_batches`` uses the same count); ``None`` without a length."""
    n = trainer.num_training_batches
    if not isinstance(n, int):  # float("inf"): an iterable dataset of unknown length
        return None
    return math.ceil(n / trainer.accumulate_grad_batches)


def _get_rng_raw(torch_state: torch.Tensor | None = None) -> tuple[Any, ...]:
    """torch's (``torch_state`` if given), numpy's and Python's global RNG states."""
    return (
        (torch.get_rng_state() if torch_state is None else torch_state),
        np.random.get_state(),
        random.getstate(),
    )


def _rng_to_plain(raw: tuple[Any, ...]) -> dict[str, Any]:
    """RNG states as tensors and ints only, so checkpoints load with ``weights_only=True``."""
    t, n, p = raw
    return {"torch": t, "numpy": n[1].tolist(), "numpy_pos": int(n[2]), "python": list(p[1])}


def _set_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))


def _clip_mixed_grad_norm_(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """``clip_grad_norm_`` (2-norm) over gradients that mix sharded DTensors and whole tensors:
    the total norm is ‖(‖g_sharded‖, ‖g_whole‖)‖ (the DTensor norm is summed over shards), and
    every gradient is scaled by min(1, max_norm / (total + 1e-6)), torch's coefficient."""
    from torch.distributed.tensor import DTensor

    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if whole:
        norms.append(torch.nn.utils.get_total_norm(whole))
    if not norms:
        return
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    locals_ = [g.to_local() for g in sharded] + whole
    torch._foreach_mul_(locals_, coef)
