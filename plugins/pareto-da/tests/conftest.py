"""Shared fixtures: a small recipe on the plugin's own task, one thread, quiet Lightning logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import paperhooks_pareto_da  # noqa: F401  (registers rotated-blobs and da-mlp)

#: plugin settings for the toy: small discriminators, a short gradient-reversal warm-up
TOY = {"discriminator_hidden": 16, "grl_max_steps": 50}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One intra-op thread, here and in subprocesses: every tensor in these tests is tiny."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet():
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def blobs_recipe(
    run_dir: Path | str,
    plugin: dict[str, Any] | None = None,
    *,
    name: str = "run",
    seed: int = 0,
    trainer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """da-mlp (16, 16) on rotated-blobs (3 classes, std 0.7), SGD with momentum, the plugin with ``TOY``."""
    return {
        "seed": seed,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "da-mlp", "hidden": [16, 16]},
        "data": {
            "name": "rotated-blobs",
            "batch_size": 64,
            "num_classes": 3,
            "std": 0.7,
            **(data or {}),
        },
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "trainer": {
            "max_steps": 6,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            **(trainer or {}),
        },
        "plugins": [{"name": "pareto-da", **TOY, **(plugin or {})}],
    }


@pytest.fixture
def make_recipe():
    """:func:`blobs_recipe` (test modules cannot import this conftest under importlib mode)."""
    return blobs_recipe
