"""One intra-op thread and quiet Lightning logs for every test of this plugin."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Every tensor here is tiny: several threads on a busy machine only slow small ops down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet():
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)
