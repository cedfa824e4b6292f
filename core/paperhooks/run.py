"""Turn a validated recipe into a datamodule, a module and a Trainer, and fit.

Every run writes to ``<run_dir>/<name>/version_<k>/``: ``recipe.yaml`` (resolved, with
plugin versions), ``checkpoints/`` (``last.ckpt``, refreshed during training, and ``on_exception.ckpt``),
``logs/metrics.csv``, TensorBoard events in ``logs/tensorboard/``, and ``metrics.json``. Under DDP the launcher re-runs the
command for the other ranks; they find the run directory rank 0 chose in the environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from paperhooks.errors import RecipeError
from paperhooks.recipe import Recipe

log = logging.getLogger(__name__)
RUN_DIR_ENV = "PAPERHOOKS_RUN_DIR"
#: strategies whose checkpoint gathers shards from every rank
SHARDED = ("fsdp2", "fsdp", "deepspeed")
#: how long a rank that stopped on an exception waits for the others before saving shards
EXCEPTION_WAIT_S = 30


@dataclass
class Built:
    recipe: Recipe
    datamodule: Any
    module: Any
    trainer: Any
    run_dir: Path


def _new_run_dir(recipe: Recipe) -> Path:
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    base = Path(recipe.run_dir) / recipe.name
    base.mkdir(parents=True, exist_ok=True)
    k = 0
    while True:
        path = base / f"version_{k}"
        try:
            path.mkdir()
            break
        except FileExistsError:
            k += 1
    os.environ[RUN_DIR_ENV] = str(path)
    return path


def _strategy(recipe: Recipe) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    t = recipe.trainer
    kind = t.strategy_kind
    if kind == "single":
        return "auto"
    if kind == "ddp":
        return DDPStrategy(
            process_group_backend="gloo" if t.accelerator == "cpu" else None,
            find_unused_parameters=t.find_unused_parameters,
        )
    if kind == "fsdp2":
        return ModelParallelStrategy(
            data_parallel_size=t.devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return kind


def make_plugins(recipe: Recipe) -> list[Any]:
    """Fresh plugin instances for the recipe's entries, in recipe order."""
    plugins = []
    for e in recipe.plugins:
        p = e.cls(e.config)
        p.name = e.name
        plugins.append(p)
    return plugins


def build_module(recipe: Recipe, info: Any, data_sizes: tuple[int, int] = (0, 0)) -> Any:
    """The recipe's task module (model + plugins + optimizer settings), without a Trainer.

    ``TaskModule`` for classification and regression, ``PreferenceModule`` for preference
    data; ``data_sizes`` (train, val) serve precomputed reference log-probabilities.
    """
    from paperhooks.taskmodule import TaskModule
    from paperhooks.tasks import build_model

    common = dict(
        plugins=make_plugins(recipe),
        optimizer=recipe.optimizer,
        seed=recipe.seed,
        strategy=recipe.trainer.strategy_kind,
        recipe={"recipe": recipe.raw, "plugin_versions": recipe.plugin_versions},
    )
    for p in common["plugins"]:
        if p.tasks and info.task not in p.tasks:
            raise RecipeError(
                f"plugins.{p.name}: works on {' or '.join(p.tasks)} data only; data {recipe.data.name!r} is {info.task}"
            )
    model = build_model(recipe.model.name, recipe.model.config, info)
    if info.task == "preference":
        from paperhooks.preference import PreferenceModule

        return PreferenceModule(model, recipe.objective, data_sizes=data_sizes, **common)
    if recipe.objective is not None:
        raise RecipeError(
            f"objective: only preference data takes objective settings; data {recipe.data.name!r} is {info.task}"
        )
    return TaskModule(
        model, info.task, info.num_classes, train_classes=info.train_classes, **common
    )


def build(recipe: Recipe, run_dir: Path | None = None, split_seed: int | None = None) -> Built:
    """Everything needed to fit ``recipe``; nothing is trained yet.

    ``split_seed`` builds the data from another seed than the recipe's (the soup ingredients
    of a stage share the stage's data split; their own seed orders the batches).
    """
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from paperhooks.tasks import build_datamodule

    RunCheckpoints = _checkpoint_callback_cls()
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    run_dir = run_dir or _new_run_dir(recipe)
    dm = build_datamodule(
        recipe.data.name, recipe.data.config, recipe.seed if split_seed is None else split_seed
    )
    dm.seed = recipe.seed  # the batch order
    module = build_module(recipe, dm.info, (len(dm.train_set), len(dm.val_set)))
    if getattr(module, "reference_model", None) is not None:
        # the frozen reference is in eval mode on purpose
        warnings.filterwarnings(
            "ignore", message=r".*module\(s\) in eval mode at the start of training.*"
        )
    t = recipe.trainer
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [RunCheckpoints(ckpt_dir, t.checkpoint_every_n_steps)]
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        devices=t.devices,
        accelerator=t.accelerator,
        strategy=_strategy(recipe),
        precision=t.precision,
        deterministic=t.deterministic,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val if module.automatic_optimization else None,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches,
        enable_progress_bar=t.enable_progress_bar,
        num_sanity_val_steps=t.num_sanity_val_steps,
        use_distributed_sampler=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=[
            CSVLogger(run_dir / "logs", name="", version=""),
            TensorBoardLogger(
                run_dir / "logs", name="", version="tensorboard", default_hp_metric=False
            ),
        ],
        callbacks=callbacks,
    )
    if not module.automatic_optimization:
        module.manual_clip = t.gradient_clip_val
    if trainer.is_global_zero:
        _write_recipe(
            run_dir / "recipe.yaml", {**recipe.raw, "plugin_versions": recipe.plugin_versions}
        )
    return Built(recipe, dm, module, trainer, run_dir)


def _checkpoint_callback_cls() -> type:
    from lightning.pytorch.callbacks import Callback

    class RunCheckpoints(Callback):
        """``last.ckpt`` after every ``every`` optimizer steps and after the final step, plus
        ``stepN.ckpt`` copies when ``keep``; ``on_exception.ckpt`` when training stops on an
        exception (Ctrl-C, SIGTERM, a crash).

        Saving at the end of a batch (not of an epoch) records the exact place in the data, so
        resuming from any of these files continues as if training had never stopped.
        """

        def __init__(self, directory: Path, every: int | None) -> None:
            self.directory = directory
            self.every = every
            self._group: Any = None  # set under sharded strategies (see setup)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            step = trainer.global_step
            final = trainer.max_steps > 0 and step >= trainer.max_steps
            last_batch = (
                trainer.max_epochs is not None
                and trainer.current_epoch == trainer.max_epochs - 1
                and batch_idx + 1 == trainer.num_training_batches
            )
            periodic = (
                self.every is not None
                and step % self.every == 0
                and step != getattr(self, "_saved", -1)
            )
            if periodic:
                trainer.save_checkpoint(self.directory / f"step{step}.ckpt", weights_only=False)
            if (
                periodic
                or final
                or last_batch
                or (self.every is None and batch_idx + 1 == trainer.num_training_batches)
            ):
                trainer.save_checkpoint(self.directory / "last.ckpt", weights_only=False)
                self._saved = step

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            # Under a sharded strategy, saving gathers the shards: every rank must take part.
            # A gloo group (on CPU and GPU alike) with a timeout lets on_exception check that.
            self._group = None
            if trainer.world_size > 1 and pl_module.hooks.ctx.strategy in SHARDED:
                import torch.distributed as td

                self._group = td.new_group(
                    backend="gloo", timeout=timedelta(seconds=EXCEPTION_WAIT_S)
                )

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            # Each fit makes its own group; free it, for scripts that call fit repeatedly.
            if self._group is not None:
                import torch.distributed as td

                td.destroy_process_group(self._group)
                self._group = None

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            """Write ``on_exception.ckpt``, without waiting on ranks that did not stop.

            An exception raised on some ranks only (a crash, an out-of-memory error) leaves
            the others inside a collective, so a barrier here would wait forever. Under DDP
            every rank holds the whole state: rank 0 writes it alone, and once a crashed rank
            has exited, the others' collectives fail and they stop too. Under a sharded
            strategy the ranks first check, within ``EXCEPTION_WAIT_S`` seconds, that all of
            them stopped; if not, no file is written and ``last.ckpt`` stays the latest.
            """
            path = self.directory / "on_exception.ckpt"
            if trainer.world_size == 1:
                trainer.save_checkpoint(path, weights_only=False)
                return
            if self._group is None:  # ddp: no barrier (Trainer.save_checkpoint has one)
                if trainer.is_global_zero:
                    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                    trainer.strategy.save_checkpoint(checkpoint, path)
                return
            import torch.distributed as td

            try:
                td.barrier(group=self._group)  # times out with the group
            except RuntimeError:
                print(
                    f"paperhooks: on_exception.ckpt not written: rank {trainer.global_rank} "
                    f"stopped on {type(exception).__name__} but not every rank did within "
                    f"{EXCEPTION_WAIT_S} s (saving a sharded model needs all of them); "
                    "resume from the latest checkpoint in checkpoints/, if any",
                    file=sys.stderr,
                    flush=True,
                )
                return
            trainer.save_checkpoint(path, weights_only=False)

    return RunCheckpoints


def _write_recipe(path: Path, data: dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(data)))


def fit(
    recipe: Recipe, resume: str | None = None, run_dir: Path | None = None
) -> tuple[Built, dict[str, float]]:
    """Fit ``recipe`` (optionally resuming from a checkpoint path); return final metrics.

    A recipe with ``stages`` runs each stage in turn (:mod:`paperhooks.stages`).
    """
    if recipe.stages:
        from paperhooks.stages import fit_stages

        return fit_stages(recipe, resume, run_dir)
    built = build(recipe, run_dir)
    kwargs = {"ckpt_path": resume, "weights_only": True} if resume else {}
    built.trainer.fit(built.module, datamodule=built.datamodule, **kwargs)
    metrics = final_metrics(built)
    if built.trainer.is_global_zero:
        (built.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return built, metrics


def final_metrics(built: Built) -> dict[str, float]:
    """The trainer's final metrics, a validation of the final weights, the trainable count."""
    metrics = {k: float(v) for k, v in built.trainer.callback_metrics.items() if v.numel() == 1}
    if built.recipe.trainer.limit_val_batches != 0:
        # the final metrics are always those of the final weights, also when max_steps
        # stopped training in the middle of an epoch
        built.trainer.validate(built.module, datamodule=built.datamodule, verbose=False)
        metrics.update(
            {k: float(v) for k, v in built.trainer.callback_metrics.items() if v.numel() == 1}
        )
    count = getattr(built.module, "trainable_parameters", None)
    if count is not None:
        metrics["model/trainable_parameters"] = float(count)
    return metrics
