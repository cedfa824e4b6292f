"""Built-in tasks: registered models and datasets that recipes name.

``MODELS`` and ``DATASETS`` map registered names to their config class and builder;
:func:`build_model` and :func:`build_datamodule` build them from a config (its dataclass,
a plain mapping or ``None`` for the defaults). Importing this package registers the
built-ins: models ``timm``, ``mlp``, ``linear``, ``causal-lm``, ``tabular-policy``; datasets
``digits``, ``regression``, ``synthetic-preferences`` and ``tabular-preferences``.
"""

from __future__ import annotations

from paperhooks.tasks import data as data
from paperhooks.tasks import models as models
from paperhooks.tasks import preference as preference
from paperhooks.tasks.data import (
    DigitsConfig,
    Duplicates,
    LabelNoise,
    PaperhooksDataModule,
    RegressionConfig,
)
from paperhooks.tasks.models import LinearConfig, MLPConfig, TimmConfig
from paperhooks.tasks.registry import (
    DATASETS,
    MODELS,
    DataInfo,
    Registered,
    build_datamodule,
    build_model,
    check_field,
    config_from_mapping,
    register_dataset,
    register_model,
)
from paperhooks.tasks.sampler import DictDataset, ShardedBatchSampler, make_loader

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
    "make_loader",
    "register_dataset",
    "register_model",
]
