"""The built-in task module: classification or regression over a registered model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from paperhooks.module import HookedModule


class TaskModule(HookedModule):
    """Classification (cross-entropy, accuracy) or regression (squared error, MSE).

    Logs ``train/acc`` and, when labels were corrupted, ``train/clean_acc`` (accuracy
    against the clean labels); ``val/acc`` or ``val/mse``; when the fit trains on some classes
    only (``train_classes``), ``val/acc_train_classes`` and ``val/acc_other_classes`` too;
    plus the metrics plugins add. All metrics are torchmetrics metrics, reduced across ranks
    by torchmetrics.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        num_classes: int,
        train_classes: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.task = task
        self.train_classes = tuple(train_classes)
        if task == "classification":

            def acc() -> torchmetrics.Metric:
                return torchmetrics.classification.MulticlassAccuracy(
                    num_classes=num_classes, average="micro"
                )

            self.train_acc, self.train_clean_acc, self.val_acc = acc(), acc(), acc()
            if not 0 < len(self.train_classes) < num_classes:
                self.train_classes = ()  # every class (or none): val/acc says it all
            if self.train_classes:
                self.val_acc_train_classes, self.val_acc_other_classes = acc(), acc()
        else:
            self.val_mse = torchmetrics.MeanSquaredError()

    def outputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self(batch["input"])
        return {"logits": out} if self.task == "classification" else {"prediction": out}

    def losses(
        self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(outputs["logits"], batch["target"], reduction="none")
        return (outputs["prediction"] - batch["target"]) ** 2

    def _log_step(
        self, reduced: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor], batch: Any
    ) -> None:
        super()._log_step(reduced, outputs, batch)
        if self.task != "classification" or "logits" not in outputs:
            return
        logits = outputs["logits"].detach()
        self.train_acc(logits, batch["target"])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if "clean_target" in batch:
            self.train_clean_acc(logits, batch["clean_target"])
            self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self.outputs(batch)
        loss = self.losses(batch, outputs).mean()
        self.log(
            "val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["input"].shape[0]
        )
        if self.task == "classification":
            self.val_acc(outputs["logits"], batch["target"])
            self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
            if self.train_classes:
                seen = torch.isin(
                    batch["target"], torch.tensor(self.train_classes, device=batch["target"].device)
                )
                for metric, rows, name in (
                    (self.val_acc_train_classes, seen, "val/acc_train_classes"),
                    (self.val_acc_other_classes, ~seen, "val/acc_other_classes"),
                ):
                    if rows.any():  # torchmetrics cannot take 0 rows; its sums stay as they are
                        metric.update(outputs["logits"][rows], batch["target"][rows])
                    self.log(name, metric, on_epoch=True)
        else:
            self.val_mse(outputs["prediction"], batch["target"])
            self.log("val/mse", self.val_mse, on_epoch=True, prog_bar=True)
        for name, metric in self.plugin_metrics.items():
            metric.update(outputs, batch)
            self.log(f"val/{name}", metric, on_epoch=True)
