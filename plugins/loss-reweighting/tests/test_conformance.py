"""loss-reweighting through the paperhooks conformance kit (every check; DDP marked slow)."""

from __future__ import annotations

from paperhooks.testing.conformance import PluginConformance


class TestConformance(PluginConformance):
    """Entry point, metadata, recipe round-trip, sample-weighting properties (NaN losses
    raise naming the plugin), a few steps, bit-identical resume, 2 processes equal 1."""

    name = "loss-reweighting"
    # The default burn-in (1000 steps) would leave the kit's short runs uniform.
    plugin_config = {"burnin_steps": 1}
