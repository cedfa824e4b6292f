from __future__ import annotations

import os

import pytest

from helpers import HERE, TEST_PLUGINS, write_distribution


@pytest.fixture
def test_plugins(tmp_path, monkeypatch):
    """Install the core's test plugins (on sys.path and PYTHONPATH for subprocesses)."""
    site = tmp_path / "site"
    write_distribution(site, "paperhooks-testplugins", TEST_PLUGINS)
    paths = [str(site), str(HERE / "testplugins")]
    for p in paths:
        monkeypatch.syspath_prepend(p)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]))
    return site
