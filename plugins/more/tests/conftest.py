"""Shared fixtures: a small recipe on the plugin's own task, and quiet Lightning logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import paperhooks_more  # noqa: F401  (registers diverse-preferences and reward-mlp)


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
    loggers = [
        logging.getLogger(n)
        for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def preference_recipe(
    run_dir: Path | str,
    plugins: list[dict[str, Any]],
    *,
    name: str = "run",
    seed: int = 0,
    trainer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    lr: float = 0.1,
) -> dict[str, Any]:
    """reward-mlp (one hidden layer of 32) on diverse-preferences (3 datasets, batch 96), SGD.

    Validation is off (``limit_val_batches: 0``): the tests measure what they need themselves.
    """
    return {
        "seed": seed,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "reward-mlp", "hidden": [32]},
        "data": {"name": "diverse-preferences", "batch_size": 96, **(data or {})},
        "optimizer": {"name": "sgd", "lr": lr},
        "trainer": {
            "max_steps": 150,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "log_every_n_steps": 1_000,
            **(trainer or {}),
        },
        "plugins": plugins,
    }


@pytest.fixture
def make_recipe():
    """:func:`preference_recipe` (test modules cannot import this conftest under importlib mode)."""
    return preference_recipe
