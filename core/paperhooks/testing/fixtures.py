"""Autouse pytest fixtures for a plugin's tests: one intra-op thread and quiet Lightning logs.

Import them into the plugin's ``tests/conftest.py`` (importing a fixture makes it active
there; autouse applies it to every test of the folder)::

    from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch intra-op thread, here and in subprocesses (``OMP_NUM_THREADS=1``): the tensors
    of plugin tests are tiny, and several threads on a busy machine only slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def quiet_lightning() -> Iterator[None]:
    """Lightning's rank-zero info lines (GPU available, ...) at WARNING during each test."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


__all__ = ["one_thread", "quiet_lightning"]
