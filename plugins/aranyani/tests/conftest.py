"""Shared fixtures: a small recipe on the plugin's own task, and quiet Lightning logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import paperhooks_aranyani  # noqa: F401  (registers oblique-forest and online-fair-stream)


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


def stream_recipe(
    run_dir: Path | str,
    plugins: list[dict[str, Any]],
    *,
    name: str = "run",
    seed: int = 0,
    trainer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The soft oblique forest (depth 3, 3 trees) on online-fair-stream, Adam lr 2e-3 (the
    official optimizer), one pass over the stream, no validation."""
    return {
        "seed": seed,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "oblique-forest", "depth": 3, "trees": 3},
        "data": {"name": "online-fair-stream", "batch_size": 16, **(data or {})},
        "optimizer": {"name": "adam", "lr": 0.002},
        "trainer": {
            "max_epochs": 1,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "log_every_n_steps": 1_000,
            **(trainer or {}),
        },
        "plugins": plugins,
    }


@pytest.fixture
def make_recipe():
    """:func:`stream_recipe` (test modules cannot import this conftest under importlib mode)."""
    return stream_recipe
