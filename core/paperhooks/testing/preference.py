"""Test helpers for preference objectives: batches of the built-in tasks and TRL's DPO loss.

:func:`trl_dpo_loss` runs TRL's own ``DPOTrainer._compute_loss`` (the reference
implementation of DPO and of its ``robust`` variant, rDPO) on per-token log-probabilities that
paperhooks computed, so a test compares the loss formulas and the masking, not two models.
TRL is a test dependency (``pip install trl``).
"""

from __future__ import annotations

import collections
import types
from collections.abc import Mapping
from typing import Any

import torch


def preference_batch(
    data: str = "synthetic-preferences", rows: int = 8, seed: int = 0, **config: Any
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(datamodule, batch)``: the first ``rows`` training pairs of a built-in preference dataset."""
    from paperhooks.tasks import build_datamodule

    dm = build_datamodule(data, config or None, seed)
    return dm, dm.train_set.__getitems__(list(range(rows)))


def preference_module(
    dm: Any, model: str = "causal-lm", model_config: Mapping[str, Any] | None = None, **kwargs: Any
) -> Any:
    """A :class:`~paperhooks.preference.PreferenceModule` over the registered ``model`` for ``dm``."""
    from paperhooks.preference import PreferenceModule
    from paperhooks.tasks import build_model

    defaults = {"layers": 1, "width": 32} if model == "causal-lm" else {}
    policy = build_model(model, {**defaults, **dict(model_config or {})}, dm.info)
    return PreferenceModule(policy, data_sizes=(len(dm.train_set), len(dm.val_set)), **kwargs)


def trl_dpo_loss(
    outputs: Mapping[str, torch.Tensor],
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """TRL's batch loss for ``outputs`` of :meth:`PreferenceModule.outputs` (mean over pairs).

    TRL's per-token log-probabilities are shifted (entry ``t`` scores token ``t + 1``); the
    completion mask is paperhooks' response mask. The reference log-probabilities are given
    as precomputed, so only the loss and its masking run in TRL.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = torch.cat([outputs["chosen_token_logps"], outputs["rejected_token_logps"]]).detach()
    mask = torch.cat([outputs["chosen_mask"], outputs["rejected_mask"]]).long()
    n, t = tok.shape
    zeros = torch.zeros(n, t - 1)

    class Model:
        training = True

        def __call__(self, **kwargs: Any) -> Any:
            return types.SimpleNamespace(
                log_probs=tok[:, 1:], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
            )

    accelerator = types.SimpleNamespace(
        device=tok.device, gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=Model(), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.int64),
        "attention_mask": torch.ones(n, t, dtype=torch.int64),
        "completion_mask": mask,
        "ref_chosen_logps": outputs["ref_chosen_logps"].detach(),
        "ref_rejected_logps": outputs["ref_rejected_logps"].detach(),
    }
    return DPOTrainer._compute_loss(trainer, Model(), inputs, return_outputs=False)


__all__ = ["preference_batch", "preference_module", "trl_dpo_loss"]
