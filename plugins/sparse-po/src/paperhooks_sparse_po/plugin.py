"""The ``sparse-po`` plugin: :func:`.functional.sparse_po_loss` with its masks, replacing DPO (``loss``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_sparse_po import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "sparse-po"

BIBTEX = """\
@misc{christopoulou2025sparsepo,
  title     = {SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks},
  author    = {Fenia Christopoulou and Ronald Cardenas and Gerasimos Lampouras and Haitham Bou-Ammar and Jun Wang},
  year      = {2025},
  note      = {Findings of EMNLP 2025},
  eprint    = {2410.05102},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2410.05102},
}"""


@dataclass(frozen=True)
class SparsePoConfig:
    """Hyper-parameters; β is the recipe's ``objective.beta``. Defaults: the official code's
    ``SparseConfig`` (``src/trainers/sparse_config.py``) unless said otherwise.

    :ivar mask: ``learned`` (the code's ``mask_model: simple_all``, a small network on the
        reference's hidden states of every layer, trained with the policy), ``derived`` (the
        code's MaPO trainer: reference activations z-normalized and rescaled to [0, 1], no
        parameters) or ``ones`` (every mask 1: the unmasked token-level objective, an ablation).
    :ivar independent: separate networks for the reward and the KL masks (the code's
        ``rw_kl_independent``, default False: one common mask). ``learned`` only.
    :ivar mask_reward: mask the reward term (``mask_on_reward``, True); False: weight 1.
    :ivar mask_kl: mask the KL term (``mask_on_kl``, True); False: weight 1.
    :ivar l1_reward: λ_u, L1 penalty on the reward masks (``l1_norm_param_u``, 0).
    :ivar l1_kl: λ_d, L1 penalty on the KL masks (``l1_norm_param_d``, 0). With one common
        mask masking both terms, both are halved, as in the code.
    :ivar dropout: dropout inside the mask network (``mask_dropout``, 0.01).
    :ivar init_std: std of the mask network's per-layer weights (0.02: GPT-2's
        ``initializer_range``, which the code's host model's ``post_init`` applies).
    """

    mask: Literal["learned", "derived", "ones"] = "learned"
    independent: bool = False
    mask_reward: bool = True
    mask_kl: bool = True
    l1_reward: float = 0.0
    l1_kl: float = 0.0
    dropout: float = 0.01
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.mask not in ("learned", "derived", "ones"):
            raise ValueError(
                f"SparsePoConfig.mask must be 'learned', 'derived' or 'ones', got {self.mask!r}"
            )
        for name in ("l1_reward", "l1_kl", "init_std"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"SparsePoConfig.{name} must be a finite number >= 0, got {v!r}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1:
            raise ValueError(f"SparsePoConfig.dropout must be in [0, 1), got {d!r}")
        if self.independent and self.mask != "learned":
            raise ValueError(
                f"SparsePoConfig.independent needs mask 'learned' (got mask {self.mask!r})"
            )


class SparsePo(Plugin):
    """SparsePO (Christopoulou et al., 2025): the SparsePO loss replaces DPO's ``loss``.

    Per pair: token rewards ``r_t`` from the core's per-token log-probabilities of the policy
    and the reference (``objective.reference: model``), token KL terms ``k_t`` from one more
    policy forward for the full next-token distributions (the reference's comes with its hidden
    states), masks from the reference's hidden states, and
    ``−log σ(β(u − d)) + λ_u‖m^u‖₁ + λ_d‖m^d‖₁`` (:func:`.functional.sparse_po_loss`).

    Every quantity is per pair (masks are per token of the pair's own responses; the derived
    mask normalizes within each response), so the core's mean over the global batch is what one
    process computes; the learned mask network's parameters are submodules of the task module,
    so DDP averages their gradients like the policy's and checkpoints hold them.
    """

    Config = SparsePoConfig
    name = NAME
    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    replaces_task_loss: ClassVar[bool] = True
    paper: ClassVar[Paper] = Paper(
        title="SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks",
        authors=("Fenia Christopoulou", "Ronald Cardenas", "Gerasimos Lampouras", "Haitham Bou-Ammar", "Jun Wang"),
        year=2025,
        venue="Findings of EMNLP 2025",
        arxiv="2410.05102",
        bibtex=BIBTEX,
        code="https://github.com/huawei-noah/HEBO/tree/master/SparsePO",
        checked_against=(
            "huawei-noah/HEBO @ 04f4ece (SparsePO/): src/trainers/sparse_trainer.py get_batch_loss_metrics "
            "(u, d, losses = -logsigmoid(beta*(u - d)) + L1 of the masks, the halved L1 of a common mask), "
            "src/masks/mask_models.py SimpleMaskAllLayers, src/trainers/mapo_trainer.py (zn_rescale, mapo_loss), "
            "src/trainers/sparse_config.py @ 97c4b8e (defaults), README.md (beta 0.8/0.1, mask_weight_decay 0.01); "
            "TRL 1.16 loss_type 'sigmoid' for the DPO reduction (m^u = 1, m^d = 0)"
        ),
    )  # fmt: skip
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: SparsePoConfig

    #: attribute names of the mask networks on the task module
    NETS: ClassVar[tuple[str, str]] = ("sparse_po_mask", "sparse_po_kl_mask")

    # -- set-up -----------------------------------------------------------------------------
    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        """Refuse what cannot work; build the learned mask network(s) on the task module."""
        reference = getattr(getattr(module, "objective", None), "reference", None)
        if reference != "model":
            raise ValueError(
                f"{NAME} needs objective.reference 'model' (per-token reference log-probabilities, the reference's "
                f"next-token distributions and hidden states); got objective.reference {reference!r}"
            )
        lm = getattr(module.model, "lm", None)
        if lm is None or not hasattr(lm, "config"):
            raise ValueError(
                f"{NAME} needs a causal-LM policy (model causal-lm: hidden states and next-token logits); "
                f"got {type(module.model).__name__}"
            )
        if self.config.mask != "learned":
            return
        cfg = lm.config
        eps = (
            getattr(cfg, "layer_norm_epsilon", None)
            or getattr(cfg, "layer_norm_eps", None)
            or getattr(cfg, "rms_norm_eps", 1e-5)
        )
        from paperhooks.tasks.sampler import generator

        device = next(module.model.parameters()).device
        names = self.NETS if self.config.independent else self.NETS[:1]
        for i, attr in enumerate(names):
            if getattr(module, attr, None) is None:
                net = F.MaskNet(cfg.hidden_size, cfg.num_hidden_layers, self.config.dropout, eps)
                net.reset(generator(ctx.seed, f"sparse-po.mask.{i}"), self.config.init_std)
                module.add_module(attr, net.to(device))

    # -- the masks --------------------------------------------------------------------------
    def masks(
        self, module: Any, hidden_states: Any, response: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m^u, m^d)`` ``[N, T]`` per token (0 off the response), from the reference's hidden
        states of every layer (``hidden_states[1:]`` of a ``transformers`` forward)."""
        c = self.config
        ones = response.clone()
        if c.mask == "ones":
            m = ones
            return (m if c.mask_reward else ones), (m if c.mask_kl else ones)
        if c.mask == "derived":
            m = F.derived_mask(hidden_states, response)
            return (m if c.mask_reward else ones), (m if c.mask_kl else ones)
        first = F.shift_to_tokens(getattr(module, self.NETS[0])(hidden_states)) * response
        second = (
            F.shift_to_tokens(getattr(module, self.NETS[1])(hidden_states)) * response
            if c.independent
            else first
        )
        return (first if c.mask_reward else ones), (second if c.mask_kl else ones)

    # -- the loss ---------------------------------------------------------------------------
    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """``{"loss": −log σ(β(u − d)) + λ_u‖m^u‖₁ + λ_d‖m^d‖₁}`` per pair (replaces DPO)."""
        from paperhooks.preference import pair_inputs

        if "ref_chosen_token_logps" not in outputs:
            raise ValueError(
                f"{NAME}: needs per-token reference log-probabilities (a preference task with objective.reference "
                f"'model'); got outputs {sorted(outputs)}"
            )
        c = self.config
        ids, attention, response = pair_inputs(batch)
        b = batch["chosen_ids"].shape[0]
        with torch.no_grad():
            ref = module.reference_model.lm(
                input_ids=ids,
                attention_mask=attention,
                output_hidden_states=c.mask != "ones",
                use_cache=False,
            )
        policy_logits = module.model.lm(
            input_ids=ids, attention_mask=attention, use_cache=False
        ).logits
        k = F.token_kl_terms(policy_logits, ref.logits)
        r_w = outputs["chosen_token_logps"] - outputs["ref_chosen_token_logps"]
        r_l = outputs["rejected_token_logps"] - outputs["ref_rejected_token_logps"]
        hidden = ref.hidden_states[1:] if c.mask != "ones" else None
        mu, md = self.masks(module, hidden, response)
        l1_u, l1_d = c.l1_reward, c.l1_kl
        if c.mask == "learned" and not c.independent and c.mask_reward and c.mask_kl:
            l1_u, l1_d = l1_u / 2.0, l1_d / 2.0  # one common mask: the code halves both
        if c.mask == "learned":
            l1_u, l1_d = (l1_u if c.mask_reward else 0.0), (l1_d if c.mask_kl else 0.0)
        else:  # fixed masks: the L1 norm is a constant without gradient; the code has no L1 for MaPO
            l1_u = l1_d = 0.0
        loss = F.sparse_po_loss(
            r_w, r_l, k[:b], k[b:], outputs["chosen_mask"], outputs["rejected_mask"],
            mu[:b], mu[b:], md[:b], md[b:], module.objective.beta, l1_u, l1_d,
        )  # fmt: skip
        return {"loss": loss}
