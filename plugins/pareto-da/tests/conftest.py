"""Shared fixtures: a small recipe on the plugin's own task, one thread, quiet Lightning logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import paperhooks_pareto_da  # noqa: F401  (registers rotated-blobs and da-mlp)
from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401

#: plugin settings for the toy: small discriminators, a short gradient-reversal warm-up
TOY = {"discriminator_hidden": 16, "grl_max_steps": 50}


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
