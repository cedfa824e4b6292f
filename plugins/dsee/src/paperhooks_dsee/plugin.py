"""The ``dsee`` plugin: :mod:`.functional` wired to the reparameterization and pruning hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch.nn.utils import parametrize

from paperhooks import pruning
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_dsee import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "dsee"

BIBTEX = """\
@inproceedings{chen2023dsee,
  title     = {{DSEE}: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models},
  author    = {Chen, Xuxi and Chen, Tianlong and Chen, Weizhu and Awadallah, Ahmed Hassan and Wang, Zhangyang and Cheng, Yu},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2023},
  eprint    = {2111.00160},
  archivePrefix = {arXiv},
}"""


@dataclass(frozen=True)
class DseeConfig:
    """Defaults: the official code (VITA-Group/DSEE ``run_glue.py`` arguments) unless said.

    :ivar r: LoRA rank r (code default 4; the RTE/SST-2 scripts use 16).
    :ivar alpha: LoRA α; the update is scaled by α/r (code default 32).
    :ivar num_sparse: N, trainable sparse entries per matrix (code default 128; scripts 16/64).
    :ivar init_std: std of A's normal init (0.02, ``modeling_bert.py`` init).
    :ivar iters: outer GreBsmo iterations (100 in the code); the rank grows by ``rank_step`` each.
    :ivar rank_step: rank added per outer iteration (5).
    :ivar tau: hard threshold of the sparse part (0.01).
    :ivar prune_mode: importance for the ``pruning_scores`` hook: ``abs`` = |ΔW| (the scripts'
        ``ABS``) on adapted layers and |W'| elsewhere; ``wabs`` = |W'| everywhere (the merged
        weight; the code default ``WABS``).
    :ivar layers: which layers get adapters (the paper: BERT's query and value).
    :ivar trainable: glob patterns of other parameters left trainable (e.g. the head).
    """

    r: int = 4
    alpha: float = 32.0
    num_sparse: int = 128
    init_std: float = 0.02
    iters: int = 100
    rank_step: int = 5
    tau: float = 0.01
    prune_mode: Literal["abs", "wabs"] = "abs"
    layers: Layers = field(default_factory=lambda: Layers(types=("Linear",)))
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("r", "num_sparse", "iters", "rank_step"):
            v = getattr(self, key)
            least = 0 if key == "num_sparse" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"DseeConfig.{key} must be an integer >= {least}, got {v!r}")
        for key in ("alpha", "init_std", "tau"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ValueError(f"DseeConfig.{key} must be a number >= 0, got {v!r}")
        if self.prune_mode not in ("abs", "wabs"):
            raise ValueError(
                f"DseeConfig.prune_mode must be 'abs' or 'wabs', got {self.prune_mode!r}"
            )
        if set(self.layers.types) - {"Linear"}:
            raise ValueError(
                f"DseeConfig.layers.types: only Linear layers are adapted, got {list(self.layers.types)}"
            )


def _delta_of(layer: torch.nn.Module) -> F.DseeDelta | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    found = [p for p in layer.parametrizations.weight if isinstance(p, F.DseeDelta)]
    return found[0] if found else None


class Dsee(Plugin):
    """DSEE (Chen et al., ACL 2023): W' = W + (α/r)(B A + S ⊙ Ω), W frozen, Ω from GreBsmo.

    ``reparam_setup`` registers :class:`.functional.DseeDelta` on the selected Linear layers
    (layer selection by the core's :func:`paperhooks.reparam.select_layers`, merging by
    :func:`paperhooks.reparam.merge`, shared with the other reparameterizations), computes Ω
    from the layer's weight and freezes every other parameter but ``trainable``. The random
    starts (A and GreBsmo's U, V) come from generators seeded by (seed, layer), identical on
    every rank. ``pruning_scores`` is DSEE's step-2 importance. A recipe expresses step 2
    with a pruning schedule in the same fit (the adapters keep training after the masks, as
    the official script), or as a second stage: stages pass the *merged* weight on, so the
    stage prunes the merged weight and tunes fresh adapters on it.
    """

    Config = DseeConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    extra_families: ClassVar[tuple[str, ...]] = ("pruning",)
    paper: ClassVar[Paper] = Paper(
        title="DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models",
        authors=(
            "Xuxi Chen",
            "Tianlong Chen",
            "Weizhu Chen",
            "Ahmed Hassan Awadallah",
            "Zhangyang Wang",
            "Yu Cheng",
        ),
        year=2023,
        venue="ACL 2023",
        arxiv="2111.00160",
        bibtex=BIBTEX,
        code="https://github.com/VITA-Group/DSEE",
        checked_against=(
            "VITA-Group/DSEE @ 61844c3 as read in resolved.md: modeling_bert.py (LoRA + S⊙M forward, init), "
            "run_glue.py lines 385-475 (GreBsmo-style support), run_glue_prune_with_WAB.py 588-621 (ABS/WABS)"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: DseeConfig

    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        c = self.config
        model = module.model
        adapters = set()
        for i, (_name, layer) in enumerate(select_layers(model, c.layers, plugin=self.name)):
            w = layer.weight.detach()
            gen = torch.Generator().manual_seed(
                1_000_003 * (ctx.seed if ctx else 0) + i
            )  # same on every rank
            s_tilde = F.grebsmo_sparse(
                w, iters=c.iters, rank_step=c.rank_step, tau=c.tau, generator=gen
            )
            omega = F.support(s_tilde, c.num_sparse)
            delta = F.DseeDelta(
                w.shape[0], w.shape[1], c.r, c.alpha, omega, c.init_std, generator=gen
            )
            parametrize.register_parametrization(layer, "weight", delta.to(w.device, w.dtype))
            adapters.update(id(p) for p in delta.parameters())
        for pname, p in model.named_parameters():
            p.requires_grad_(
                id(p) in adapters or any(fnmatch.fnmatchcase(pname, pat) for pat in c.trainable)
            )

    @hookimpl
    def pruning_scores(
        self, params: Mapping[str, torch.Tensor], module: Any, ctx: StepContext
    ) -> Any:
        if self.config.prune_mode == "wabs":
            return pruning.magnitude_scores(params)
        layers = pruning.prunable(module.model)
        out = {}
        for k, w in params.items():
            d = _delta_of(layers[k])
            out[k] = d.delta().detach().abs() if d is not None else w.detach().abs()
            if d is not None and not bool(out[k].any()):
                raise ValueError(
                    f"dsee: prune_mode 'abs' scores layer {k!r} by |ΔW|, which is 0 (fresh adapters, e.g. a stage "
                    "that starts from merged weights): prune later in the same fit, or use prune_mode: wabs"
                )
        return out
