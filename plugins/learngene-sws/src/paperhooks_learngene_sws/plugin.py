"""The ``learngene-sws`` plugin: :mod:`.functional` wired to the reparameterization and objective hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_learngene_sws import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "learngene-sws"

BIBTEX = """\
@inproceedings{xia2024exploring,
  title     = {Exploring Learngene via Stage-wise Weight Sharing for Initializing Variable-sized Models},
  author    = {Xia, Shi-Yu and Zhu, Wenxuan and Yang, Xu and Geng, Xin},
  booktitle = {Proceedings of the Thirty-Third International Joint Conference on Artificial Intelligence (IJCAI)},
  year      = {2024},
  eprint    = {2404.16897},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2404.16897}
}"""


def _ints(name: str, values: object, minimum: int) -> None:
    ok = isinstance(values, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
    )
    if not ok:
        raise ValueError(
            f"LearngeneSwsConfig.{name} must be a list of integers >= {minimum}, got {values!r}"
        )


@dataclass(frozen=True)
class LearngeneSwsConfig:
    """Hyper-parameters; defaults from AlphaXia/SWS (files named per field).

    The plugin has two roles, set by the recipe:

    - **learngene training** (``stages`` non-empty): the blocks of ``container`` are shared
      stage-wise and the model learns by distillation from ``teacher``;
    - **descendant** (``learngene`` set, ``stages: []``): the model's blocks are initialized
      from a learngene checkpoint, then trained normally.

    :ivar stages: k_s, blocks per stage of the auxiliary model (``aux_models.py``: [3, 3, 4, 3, 3]
        for the 16-layer auxiliary DeiT). ``[]``: no sharing.
    :ivar container: the ``nn.ModuleList``/``nn.Sequential`` of blocks (``blocks`` in the
        plugin's ``learngene-mlp`` and in timm's ViTs).
    :ivar teacher: checkpoint of a paperhooks run whose model is the teacher (``--teacher-model``,
        levit_384 in the scripts); ``null``: no distillation, the loss is cross-entropy.
    :ivar distillation: ``soft`` (KL at temperature τ) or ``hard`` (CE on the teacher's argmax)
        (``--distillation-type soft`` in the scripts).
    :ivar alpha: α, weight of the distillation term (``--distillation-alpha 1.0`` in the
        scripts: pure distillation; main.py's default is 0.5).
    :ivar tau: T (``--distillation-tau``, default 1.0).
    :ivar learngene: checkpoint of a learngene-training run to expand into this model.
    :ivar layers_source: σ(j), the stage that initializes descendant block j (``--layers-source``,
        e.g. ``0,0,0,1,1,1,2,2,3,3,4,4``); ``[]``: spread evenly (:func:`~.functional.spread`).
    :ivar copy: other parts copied from the learngene by name (``gene_tranfer_1`` copies the
        patch embedding, the position embedding and the final norm).
    :ivar load_head: also copy ``head`` (the code does for ImageNet descendants, which share the
        learngene's classes; for another label set, set false).
    """

    stages: tuple[int, ...] = (3, 3, 4, 3, 3)
    container: str = "blocks"
    teacher: str | None = None
    distillation: Literal["soft", "hard"] = "soft"
    alpha: float = 1.0
    tau: float = 1.0
    learngene: str | None = None
    layers_source: tuple[int, ...] = ()
    copy: tuple[str, ...] = ("stem", "norm")
    load_head: bool = True

    def __post_init__(self) -> None:
        _ints("stages", self.stages, 1)
        _ints("layers_source", self.layers_source, 0)
        if not self.container:
            raise ValueError(
                "LearngeneSwsConfig.container must name the module holding the blocks, got ''"
            )
        a, t = self.alpha, self.tau
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a <= 1:
            raise ValueError(f"LearngeneSwsConfig.alpha must be a number in [0, 1], got {a!r}")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"LearngeneSwsConfig.tau must be a finite number > 0, got {t!r}")
        if self.learngene is not None and self.stages:
            raise ValueError(
                f"LearngeneSwsConfig.stages must be [] for a descendant (learngene: {self.learngene!r}): descendants "
                f"are not shared; got stages {list(self.stages)}"
            )
        if self.layers_source and self.learngene is None:
            raise ValueError(
                "LearngeneSwsConfig.layers_source needs learngene (the checkpoint to expand)"
            )


def load_run_model(path: str | Path) -> nn.Module:
    """The model of a paperhooks run's checkpoint, rebuilt from the recipe stored in it
    (``weights_only`` load; the model and data are named, never imported)."""
    from paperhooks.tasks import build_datamodule
    from paperhooks.tasks.registry import build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    recipe = ckpt["paperhooks"]["recipe"]["recipe"]
    model_cfg, data_cfg = dict(recipe["model"]), dict(recipe["data"])
    info = build_datamodule(data_cfg.pop("name"), data_cfg, seed=recipe.get("seed", 0)).info
    net = build_model(model_cfg.pop("name"), model_cfg, info)
    net.load_state_dict(
        {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    )
    return net.eval().requires_grad_(False)


class LearngeneSws(Plugin):
    """SWS: stage-wise weight sharing of an auxiliary model trained by distillation, and the
    expansion of its learngene layers into descendants of any depth.

    Sharing is structural, as in the code's ``RepeatedModuleList``: block j of stage s is the
    stage's first block (one module object; autograd sums its gradients over the k_s uses). The
    expansion copies tensors once, at set-up, identically on every rank; distillation is a
    per-sample loss, normalized by the core over the global batch. Under FSDP2 the core's
    sharding wraps each leaf module once, and a shared block's leaves would be all-gathered
    and reduce-scattered once per use: tested equal to one process (see the method card).
    """

    Config = LearngeneSwsConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    extra_families: ClassVar[tuple[str, ...]] = ("objective",)
    replaces_task_loss: ClassVar[bool] = True
    paper: ClassVar[Paper] = Paper(
        title="Exploring Learngene via Stage-wise Weight Sharing for Initializing Variable-sized Models",
        authors=("Shi-Yu Xia", "Wenxuan Zhu", "Xu Yang", "Xin Geng"),
        year=2024,
        venue="IJCAI 2024",
        arxiv="2404.16897",
        bibtex=BIBTEX,
        code="https://github.com/AlphaXia/SWS",
        checked_against=(
            "AlphaXia/SWS @ 8b976076ffff012ec4fe755936de4fdf7eae9597: SWS_vit.py (RepeatedModuleList), "
            "aux_models.py (stages 3,3,4,3,3), losses.py (DistillationLoss), utils.py (gene_tranfer_1), "
            "main.py (--distillation-* defaults); README fine-tuning settings per /work/shared/papers/resolved.md "
            "(HEAD 2ad3b64)"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: LearngeneSwsConfig

    def __init__(self, config: LearngeneSwsConfig | None = None) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.layers_source: tuple[int, ...] = ()

    def _blocks(self, model: nn.Module) -> nn.Module:
        name = self.config.container
        try:
            blocks = model.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(
                f"plugin {self.name!r}: the model has no module {name!r} holding its blocks (container); "
                f"its children are {children}. Use model learngene-mlp, or a timm ViT with container: blocks"
            ) from None
        if not isinstance(blocks, nn.ModuleList | nn.Sequential):
            raise ValueError(
                f"plugin {self.name!r}: {name!r} is a {type(blocks).__name__}, not a ModuleList or Sequential"
            )
        return blocks

    # -- hooks -------------------------------------------------------------------------------------
    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Expand a learngene into the model (descendant), or share its blocks stage-wise
        (learngene training). Before sharding and before the optimizer."""
        c = self.config
        blocks = self._blocks(module.model)
        if c.learngene is not None:
            self.layers_source = self.expand(module.model, blocks)
        if c.stages:
            F.tie_stages(blocks, c.stages)

    def expand(self, model: nn.Module, blocks: nn.Module) -> tuple[int, ...]:
        """Copy θ_{σ(j)} into block j and the ``copy`` parts (and the head) into ``model``."""
        c = self.config
        ckpt = torch.load(c.learngene, map_location="cpu", weights_only=True)
        owners = [
            p["state"]
            for p in ckpt.get("paperhooks", {}).get("plugins", [])
            if p["state"].get("stages")
        ]
        if not owners:
            raise ValueError(
                f"plugin {self.name!r}: {c.learngene} is not a learngene: no plugin state with stages in it"
            )
        stages, container = owners[0]["stages"], owners[0]["container"]
        state = ckpt["state_dict"]
        sigma = c.layers_source or F.spread(len(blocks), len(stages))
        F.expand(F.learngene_layers(state, f"model.{container}.", stages), blocks, sigma)
        parts: dict[str, torch.Tensor] = {}
        for part in (*c.copy, *(("head",) if c.load_head else ())):
            found = {
                k[len("model.") :]: v.clone()
                for k, v in state.items()
                if k == f"model.{part}" or k.startswith(f"model.{part}.")
            }
            if not found:
                raise ValueError(
                    f"plugin {self.name!r}: the learngene has no part {part!r} to copy"
                )
            parts.update(found)
        missing, unexpected = model.load_state_dict(parts, strict=False)
        if unexpected:
            raise ValueError(
                f"plugin {self.name!r}: the model has no {unexpected} to copy the learngene's into"
            )
        return tuple(sigma)

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor]:
        """L_i = (1 − α)·CE_i + α·KD_i per sample (cross-entropy alone without a teacher)."""
        logits = outputs["logits"]
        teacher_logits = None
        if self.config.teacher is not None and self.teacher is None:
            self.teacher = load_run_model(
                self.config.teacher
            )  # first training step: export never needs it
        if self.teacher is not None:
            if next(self.teacher.parameters()).device != logits.device:
                self.teacher.to(logits.device)
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input"])
        c = self.config
        return {
            "loss": F.distillation_loss(
                logits,
                teacher_logits,
                batch["target"],
                alpha=c.alpha,
                tau=c.tau,
                kind=c.distillation,
            )
        }

    @hookimpl
    def reparam_merge(self, model: Any) -> None:
        """Untie: every block gets its own copy, so the merged model is a plain one."""
        F.untie(self._blocks(model))

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a descendant's expansion reads: the stages and where the blocks are."""
        return {
            "stages": list(self.config.stages),
            "container": self.config.container,
            "layers_source": list(self.layers_source),
        }
