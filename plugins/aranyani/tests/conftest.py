"""Shared fixtures: a small recipe on the plugin's own task, and quiet Lightning logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import paperhooks_aranyani  # noqa: F401  (registers oblique-forest and online-fair-stream)
from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401


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
