"""Shared fixtures: a small recipe on the plugin's own task, and quiet Lightning logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import paperhooks_more  # noqa: F401  (registers diverse-preferences and reward-mlp)
from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401


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
