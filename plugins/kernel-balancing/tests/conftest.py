"""Shared fixtures: a small recipe on the plugin's own task, and quiet Lightning logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import paperhooks_kernel_balancing  # noqa: F401  (registers synthetic-recsys and mf)
from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401

# The fit is the plugin's only cost; these settings keep it to a fraction of a second.
FAST = {"feature_steps": 30, "fit_steps": 30, "num_centers": 16}


def recsys_recipe(
    run_dir: Path | str,
    plugins: list[dict[str, Any]],
    *,
    name: str = "run",
    seed: int = 0,
    trainer: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    lr: float = 0.03,
) -> dict[str, Any]:
    """MF (rank 2 + biases) on synthetic-recsys with Adam, weight decay and a cosine schedule.

    Validation runs once, after training (``check_val_every_n_epoch`` is huge): ``val/mse`` is
    the error on all user-item pairs against their true ratings.
    """
    return {
        "seed": seed,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "mf", "dim": 2},
        "data": {"name": "synthetic-recsys", "batch_size": 256, **(data or {})},
        "optimizer": {"name": "adam", "lr": lr, "weight_decay": 0.01, "scheduler": "cosine"},
        "trainer": {
            "max_steps": 300,
            "enable_progress_bar": False,
            "check_val_every_n_epoch": 1_000_000,
            "log_every_n_steps": 1_000,
            **(trainer or {}),
        },
        "plugins": plugins,
    }


@pytest.fixture
def make_recipe():
    """:func:`recsys_recipe` (test modules cannot import this conftest under importlib mode)."""
    return recsys_recipe


@pytest.fixture
def fast() -> dict[str, Any]:
    """Plugin settings that make the fit cheap."""
    return dict(FAST)
