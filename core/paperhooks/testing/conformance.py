"""The conformance kit: the checks every paperhooks plugin's tests run.

A plugin's tests inherit them (new checks added here reach every plugin)::

    from paperhooks.testing.conformance import PluginConformance

    class TestConformance(PluginConformance):
        name = "loss-reweighting"
        plugin_config = {"burnin_steps": 1}  # so that it acts within a few steps

or call the checks one by one. Each raises :class:`ConformanceError` (an ``AssertionError``)
naming the plugin and what failed:

- :func:`check_entry_point`: the name loads through ``paperhooks.discovery``;
- :func:`check_metadata`: paper, family, strategies, frozen config with defaults, hooks;
- :func:`check_recipe_roundtrip`: a recipe with the plugin validates, its config
  survives YAML and validates again to an equal config;
- :func:`check_family`: the property checks of the plugin's family
  (:mod:`paperhooks.testing.families`);
- :func:`check_few_steps`: one epoch of the kit's tiny recipe, in-process, stays finite;
- :func:`check_resume`: resuming from a mid-run step checkpoint ends bit-identical;
- :func:`check_ddp_equals_single`: 2 processes (through the command line) end where 1
  process ends on the global batch.

The runs train :func:`tiny_recipe`: an MLP on scikit-learn's digits (no download), on CPU.
The checks live in :mod:`.metadata`, :mod:`.families` and :mod:`.runs`; this module gathers
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from paperhooks.plugin import Plugin
from paperhooks.testing.families import FAMILY_CHECKS, ConformanceError, fail, label
from paperhooks.testing.metadata import (
    PREFERENCE_TASK,
    check_entry_point,
    check_metadata,
    check_recipe_roundtrip,
    discovered,
    make_plugin,
    tiny_recipe,
)
from paperhooks.testing.runs import (
    assert_nested_close,
    check_ddp_equals_single,
    check_few_steps,
    check_resume,
)


def check_family(
    plugin: str | Plugin,
    plugin_config: Mapping[str, Any] | None = None,
    *,
    task: Mapping[str, Any] | None = None,
    **options: Any,
) -> None:
    """The property checks of the plugin's family (see :mod:`paperhooks.testing.families`).

    :param plugin: an entry-point name (built with ``plugin_config``) or a plugin instance.
    :param task: the plugin's own task (e.g. ``PREFERENCE_TASK``) for the objective check.
    :param options: keyword options of the family's check (e.g. ``reads_losses=False``).
        Checks of ``extra_families`` run too, with their defaults.
    """
    instance = make_plugin(plugin, plugin_config) if isinstance(plugin, str) else plugin
    for family in (instance.family, *instance.extra_families):
        check = FAMILY_CHECKS.get(family)
        if check is None:
            fail(label(instance), f"family {family!r} is not one of {', '.join(FAMILY_CHECKS)}")
        kwargs = dict(options) if family == instance.family else {}
        if task is not None and family == "objective":
            kwargs["task"] = task
        check(instance, **kwargs)


# -- pytest -----------------------------------------------------------------------------------------------
class PluginConformance:
    """Every check of the kit as pytest tests; inherit it in a class named ``Test...``.

    :cvar name: the plugin's entry-point name.
    :cvar plugin_config: recipe values under which the plugin acts within the few steps of
        the run checks (e.g. a short burn-in); also used by the property checks.
    :cvar family_options: keyword options of the family's property check.
    :cvar task: the plugin's own task for the runs and the objective check (e.g.
        ``PREFERENCE_TASK``); ``None``: the kit's MLP on digits.
    """

    name: ClassVar[str] = ""
    plugin_config: ClassVar[Mapping[str, Any]] = {}
    family_options: ClassVar[Mapping[str, Any]] = {}
    task: ClassVar[Mapping[str, Any] | None] = None

    def _name(self) -> str:
        if not self.name:
            raise ConformanceError(
                f"{type(self).__name__} must set `name` to the plugin's entry-point name"
            )
        return self.name

    def test_loads_through_its_entry_point(self) -> None:
        check_entry_point(self._name())

    def test_metadata_is_complete(self) -> None:
        check_metadata(check_entry_point(self._name()), self._name())

    def test_recipe_config_round_trips(self) -> None:
        check_recipe_roundtrip(self._name(), self.plugin_config)

    def test_family_properties_hold(self) -> None:
        check_family(self._name(), self.plugin_config, task=self.task, **self.family_options)

    def test_few_steps_stay_finite(self, tmp_path: Path) -> None:
        check_few_steps(self._name(), self.plugin_config, tmp_path, task=self.task)

    def test_resume_is_bit_identical(self, tmp_path: Path) -> None:
        check_resume(self._name(), self.plugin_config, tmp_path, task=self.task)

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path: Path) -> None:
        check_ddp_equals_single(self._name(), self.plugin_config, tmp_path, task=self.task)


__all__ = [
    "ConformanceError",
    "PluginConformance",
    "assert_nested_close",
    "check_ddp_equals_single",
    "check_entry_point",
    "check_family",
    "check_few_steps",
    "check_metadata",
    "check_recipe_roundtrip",
    "check_resume",
    "discovered",
    "make_plugin",
    "PREFERENCE_TASK",
    "tiny_recipe",
]
