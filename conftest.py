"""Repository-wide pytest set-up: what the default test run covers.

The default run (``python3.11 dev.py test``, and CI) runs every test of the core — its
multi-process checks included (``tests/test_distributed.py``, ``tests/test_gradients.py``,
``tests/test_stacking.py``) — and every plugin test except the plugins' own ``slow`` multi-process
checks (each plugin's 2-process DDP/FSDP2 runs through the CLI, named ``*process*``), which
together take longer than the 20 minutes a CI run may use on 2 cores. The plugins' slow
effect experiments do run. Those run with
``python3.11 dev.py test --all`` (which sets ``PAPERHOOKS_FULL_SUITE=1``); each is reported
as skipped, with that command, in the default run. So are the few core tests marked
``full_suite``: multi-process checks whose code path another default test already runs (e.g.
``iterative-pruning`` under DDP/FSDP2, whose selection is the one the gradual-pruning check
exercises; the template's every-family test, whose parts other default template tests cover).
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PAPERHOOKS_FULL_SUITE") == "1":
        return
    skip = pytest.mark.skip(
        reason="a plugin's multi-process check: run `python3.11 dev.py test --all` (PAPERHOOKS_FULL_SUITE=1)"
    )
    root = config.rootpath
    for item in items:
        if item.get_closest_marker("full_suite") is not None:
            item.add_marker(
                pytest.mark.skip(
                    reason="a core check another default test covers: run `python3.11 dev.py test --all`"
                )
            )
            continue
        if item.get_closest_marker("slow") is None or "process" not in item.name:
            continue  # only multi-process checks are left to --all; slow experiments run
        try:
            top = item.path.relative_to(root).parts[0]
        except ValueError:
            continue
        if top == "plugins":
            item.add_marker(skip)
