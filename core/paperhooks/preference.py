"""Preference optimization: DPO as the base objective, managed reference models, the task module.

DPO (Rafailov et al., NeurIPS 2023, arXiv 2305.18290, eq. 7) on a pair ``(x, y_w, y_l)``::

    h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]
    L_DPO = −log σ(β · h)

with sequence log-probabilities summed over the response tokens only (``chosen_mask`` /
``rejected_mask``: never the prompt, never padding). The implicit rewards are
``r̂ = β (log π_θ − log π_ref)``. The numbers agree with TRL's ``DPOTrainer`` (loss type
``sigmoid``) on the same log-probabilities (``tests/test_preference.py``).

The reference model (recipe ``objective.reference``):

- ``model`` (default): a frozen copy of the initial policy, a submodule of the task module:
  replicated under DDP (identical on every rank), sharded like the policy under FSDP2, saved in
  checkpoints. Iterative methods refresh it with :meth:`PreferenceModule.snapshot_reference`
  (the policy's current weights, identical on all ranks).
- ``precomputed``: the reference log-probabilities of every training and validation pair are
  computed once at the start of the fit (from the initial policy, on every rank, identically),
  kept in buffers (so in checkpoints: a resumed run does not recompute them from trained
  weights) and looked up by ``index``. No reference forward during training; per-token
  reference log-probabilities are then not available.
- ``none``: reference-free (``log π_ref = 0``).

Objective plugins get every quantity in ``outputs`` (see :meth:`PreferenceModule.outputs`)
and add or replace named terms; sample-weighting plugins weight pairs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from paperhooks.module import HookedModule
from paperhooks.objective import PreferenceObjective


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair ``−log σ(β h)``, ``h`` the difference of log-ratios (eq. 7 of the DPO paper)."""
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def log_ratio_margin(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``h`` per pair from a :meth:`PreferenceModule.outputs` mapping."""
    return (outputs["chosen_logps"] - outputs["ref_chosen_logps"]) - (
        outputs["rejected_logps"] - outputs["ref_rejected_logps"]
    )


def pair_inputs(
    batch: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention, mask)`` of chosen then rejected sequences, ``[2B, T]`` each."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    attention = torch.cat([batch["chosen_attention"], batch["rejected_attention"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).float()
    return ids, attention, mask


class PreferenceModule(HookedModule):
    """Preference pairs through a policy (``model(ids, attention)`` → per-token log-probs).

    :param model: the policy (see :mod:`paperhooks.tasks.preference`).
    :param objective: β and the reference mode.
    :param data_sizes: ``(n_train, n_val)``, for ``reference: precomputed``.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: PreferenceObjective | None = None,
        *,
        data_sizes: tuple[int, int] = (0, 0),
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.objective = objective or PreferenceObjective()
        self.reference_model: nn.Module | None = None
        if self.objective.reference == "model":
            self.reference_model = copy.deepcopy(model).requires_grad_(False).eval()
        if self.objective.reference == "precomputed":
            n_train, n_val = data_sizes
            if n_train < 1:
                raise ValueError(
                    "objective.reference 'precomputed' needs the data sizes (data_sizes=(n_train, n_val))"
                )
            self.register_buffer("ref_train", torch.zeros(n_train, 2))
            self.register_buffer("ref_val", torch.zeros(max(n_val, 1), 2))
            self.register_buffer("ref_ready", torch.zeros((), dtype=torch.bool))
        self._split = "train"
        self.train_reward_acc = torchmetrics.MeanMetric()
        self.train_margin = torchmetrics.MeanMetric()
        self.val_reward_acc = torchmetrics.MeanMetric()
        self.val_ranking_acc = torchmetrics.MeanMetric()
        self.val_margin = torchmetrics.MeanMetric()

    def train(self, mode: bool = True) -> PreferenceModule:
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()
        return self

    # -- the model contract -----------------------------------------------------------------
    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(ids, attention)

    def outputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Policy and reference log-probabilities of both responses of every pair.

        Keys: ``chosen_logps``/``rejected_logps`` ``[B]`` (sums over response tokens),
        ``chosen_token_logps``/``rejected_token_logps`` ``[B, T]`` (0 off the response),
        ``chosen_mask``/``rejected_mask`` ``[B, T]``, ``ref_chosen_logps``/``ref_rejected_logps``
        ``[B]``, and with ``reference: model`` also ``ref_chosen_token_logps``/
        ``ref_rejected_token_logps``. One policy forward over ``[chosen; rejected]``.
        """
        ids, attention, mask = pair_inputs(batch)
        b = batch["chosen_ids"].shape[0]
        tok = self(ids, attention) * mask
        seq = tok.sum(1)
        out = {
            "chosen_token_logps": tok[:b],
            "rejected_token_logps": tok[b:],
            "chosen_mask": mask[:b],
            "rejected_mask": mask[b:],
            "chosen_logps": seq[:b],
            "rejected_logps": seq[b:],
        }
        out.update(self.reference_logps(batch, ids, attention, mask))
        return out

    @torch.no_grad()
    def reference_logps(
        self,
        batch: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
        attention: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        b = batch["chosen_ids"].shape[0]
        mode = self.objective.reference
        if mode == "model":
            assert self.reference_model is not None
            tok = self.reference_model(ids, attention) * mask
            seq = tok.sum(1)
            return {
                "ref_chosen_token_logps": tok[:b],
                "ref_rejected_token_logps": tok[b:],
                "ref_chosen_logps": seq[:b],
                "ref_rejected_logps": seq[b:],
            }
        if mode == "precomputed":
            table = self.ref_train if self._split == "train" else self.ref_val
            rows = table[batch["index"]]
            return {"ref_chosen_logps": rows[:, 0], "ref_rejected_logps": rows[:, 1]}
        zero = torch.zeros(b, device=ids.device)
        return {"ref_chosen_logps": zero, "ref_rejected_logps": zero.clone()}

    def losses(
        self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The DPO loss per pair (named ``loss``)."""
        return dpo_loss(
            outputs["chosen_logps"],
            outputs["rejected_logps"],
            outputs["ref_chosen_logps"],
            outputs["ref_rejected_logps"],
            self.objective.beta,
        )

    # -- reference management ---------------------------------------------------------------
    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """Make the reference a copy of the policy's current weights (identical on all ranks)."""
        if self.reference_model is None:
            raise ValueError(
                f"snapshot_reference needs objective.reference 'model' (the recipe has {self.objective.reference!r})"
            )
        policy = dict(self.model.named_parameters())
        ref = dict(self.reference_model.named_parameters())
        if policy.keys() != ref.keys():
            raise ValueError(
                "snapshot_reference: the policy's parameters differ from the reference's "
                "(a reparameterization plugin changed them); snapshots of reparameterized policies are not supported"
            )
        for k, p in policy.items():
            ref[k].copy_(p.detach())

    @torch.no_grad()
    def _precompute(self) -> None:
        dm = self.trainer.datamodule
        for ds, table in ((dm.train_set, self.ref_train), (dm.val_set, self.ref_val)):
            rows = ds.tensors
            n = rows["index"].shape[0]
            for start in range(0, n, 256):
                chunk = {k: v[start : start + 256].to(self.device) for k, v in rows.items()}
                ids, attention, mask = pair_inputs(chunk)
                seq = (self.model(ids, attention) * mask).sum(1)
                m = chunk["chosen_ids"].shape[0]
                table[start : start + m] = torch.stack([seq[:m], seq[m:]], 1)
        self.ref_ready.fill_(True)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.objective.reference == "precomputed" and not bool(self.ref_ready):
            self._precompute()

    def _shard(self) -> None:
        super()._shard()
        if self.reference_model is not None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
            for m in self.reference_model.modules():
                if (
                    m is not self.reference_model
                    and any(True for _ in m.parameters(recurse=False))
                    and not list(m.children())
                ):
                    fully_shard(m, mesh=mesh)
            fully_shard(self.reference_model, mesh=mesh)

    # -- steps ------------------------------------------------------------------------------------
    def training_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        self._split = "train"
        return super().training_step(batch, batch_idx)

    def _log_step(
        self, reduced: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor], batch: Any
    ) -> None:
        super()._log_step(reduced, outputs, batch)
        h = log_ratio_margin(outputs).detach()
        self.train_reward_acc((h > 0).float())
        self.train_margin(self.objective.beta * h)
        self.log("train/reward_acc", self.train_reward_acc, on_step=False, on_epoch=True)
        self.log("train/reward_margin", self.train_margin, on_step=False, on_epoch=True)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._split = "val"
        outputs = self.outputs(batch)
        loss = self.losses(batch, outputs)
        self._split = "train"
        h = log_ratio_margin(outputs)
        b = batch["chosen_ids"].shape[0]
        self.log("val/loss", loss.mean(), on_epoch=True, sync_dist=True, batch_size=b)
        self.val_reward_acc((h > 0).float())
        self.val_ranking_acc((outputs["chosen_logps"] > outputs["rejected_logps"]).float())
        self.val_margin(self.objective.beta * h)
        self.log("val/reward_acc", self.val_reward_acc, on_epoch=True, prog_bar=True)
        self.log("val/ranking_acc", self.val_ranking_acc, on_epoch=True)
        self.log("val/reward_margin", self.val_margin, on_epoch=True)
        for name, metric in self.plugin_metrics.items():
            metric.update(outputs, batch)
            self.log(f"val/{name}", metric, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        from paperhooks.tasks.preference import TabularPolicy

        dm = getattr(self.trainer, "datamodule", None)
        table = getattr(dm, "reward_table", None)
        if (
            isinstance(self.model, TabularPolicy)
            and table is not None
            and dm.preference_matrix is not None
        ):
            probs = self.model.log_probs().exp().detach()
            self.log(
                "val/expected_reward", (probs * table.to(probs.device)).sum(1).mean(), on_epoch=True
            )
        elif self.objective.eval_samples and table is not None:
            reward, length = self.sample_eval(self.objective.eval_samples)
            self.log("val/sample_reward", reward, on_epoch=True)
            self.log("val/sample_length", length, on_epoch=True)

    @torch.no_grad()
    def sample_eval(
        self, n: int, seed: int | None = None, policy: nn.Module | None = None
    ) -> tuple[float, float]:
        """Sample responses for the first ``n`` validation prompts; mean hidden reward and length.

        ``policy``: another policy to sample (e.g. ``self.reference_model``); default the policy.

        Uses a generator seeded from the recipe seed (and ``seed``), so every rank samples the
        same responses; the result does not depend on the number of processes.
        """
        from paperhooks.tasks.preference import sample
        from paperhooks.tasks.sampler import generator

        dm = self.trainer.datamodule
        rows = dm.val_set.tensors
        n = min(n, rows["index"].shape[0])
        L = dm.prompt_length
        prompts = rows["chosen_ids"][:n, :L].to(self.device)
        g = generator(self.hooks.ctx.seed if seed is None else seed, "preference.sample")
        width = rows["chosen_ids"].shape[1] - L - 1
        tokens, lengths = sample(policy or self.model, prompts, width + 1, g)
        content = (tokens >= 2).float()
        reward = dm.hidden_reward(rows["prompt"][:n].to(self.device), tokens, content)
        return float(reward.mean()), float(lengths.float().mean())


__all__ = ["PreferenceModule", "PreferenceObjective", "dpo_loss", "log_ratio_margin", "pair_inputs"]
