"""Built-in tasks: registered models and datasets that recipes name.

``MODELS`` and ``DATASETS`` map registered names to their config class and builder;
:func:`build_model` and :func:`build_datamodule` build them from a config (its dataclass,
a plain mapping or ``None`` for the defaults). The built-ins — models ``timm``, ``mlp``,
``linear``, ``causal-lm``, ``tabular-policy``; datasets ``digits``, ``regression``,
``synthetic-preferences`` and ``tabular-preferences`` — and every installed plugin's tasks
(entry-point group ``paperhooks.tasks``) register on the first lookup
(:func:`paperhooks.tasks.registry.load_tasks`).

Importing this package is cheap: the data and model modules (which import Lightning and
timm) load when one of their names is first used, so listing plugins or importing
``paperhooks.tasks.registry`` does not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

from paperhooks.tasks.registry import (
    DATASETS,
    MODELS,
    DataInfo,
    Registered,
    build_datamodule,
    build_model,
    check_field,
    config_from_mapping,
    load_tasks,
    register_dataset,
    register_model,
)

#: names re-exported from the heavier submodules, loaded on first use
_LAZY = {
    "data": "paperhooks.tasks.data",
    "models": "paperhooks.tasks.models",
    "preference": "paperhooks.tasks.preference",
    "DigitsConfig": "paperhooks.tasks.data",
    "Duplicates": "paperhooks.tasks.data",
    "LabelNoise": "paperhooks.tasks.data",
    "PaperhooksDataModule": "paperhooks.tasks.datamodule",
    "PreferenceDataModule": "paperhooks.tasks.datamodule",
    "RegressionConfig": "paperhooks.tasks.data",
    "LinearConfig": "paperhooks.tasks.models",
    "MLPConfig": "paperhooks.tasks.models",
    "TimmConfig": "paperhooks.tasks.models",
    "DictDataset": "paperhooks.tasks.sampler",
    "ShardedBatchSampler": "paperhooks.tasks.sampler",
    "make_loader": "paperhooks.tasks.sampler",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'paperhooks.tasks' has no attribute {name!r}")
    module = importlib.import_module(target)
    return module if target.endswith("." + name) else getattr(module, name)


__all__ = [
    "DATASETS",
    "MODELS",
    "DataInfo",
    "DictDataset",
    "DigitsConfig",
    "Duplicates",
    "LabelNoise",
    "LinearConfig",
    "MLPConfig",
    "PaperhooksDataModule",
    "Registered",
    "RegressionConfig",
    "ShardedBatchSampler",
    "TimmConfig",
    "build_datamodule",
    "build_model",
    "check_field",
    "config_from_mapping",
    "load_tasks",
    "make_loader",
    "register_dataset",
    "register_model",
]
