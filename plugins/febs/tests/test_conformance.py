"""febs and febs-metric through the paperhooks conformance kit, on digits with identity groups.

The kit's recipe and test batch carry no ``group``, which both plugins need. Until the kit
takes data options, this module wraps its ``tiny_recipe`` (adding ``data.groups: 2``) and
``tiny_batch`` (adding ``group``) for its own tests. 2-process runs are marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from paperhooks.testing import families as kit_families
from paperhooks.testing import fit_cli
from paperhooks.testing import runs as kit_runs
from paperhooks.testing.conformance import PluginConformance, check_ddp_equals_single, tiny_recipe


@pytest.fixture(autouse=True)
def digits_with_groups(monkeypatch):
    def recipe(*args, **kwargs):
        raw = tiny_recipe(*args, **kwargs)
        raw["data"] = {**raw["data"], "groups": 2}
        return raw

    batch = kit_families.tiny_batch

    def grouped_batch(n: int = 6, *args, **kwargs):
        return {**batch(n, *args, **kwargs), "group": torch.arange(n) % 2}

    monkeypatch.setattr(kit_runs, "tiny_recipe", recipe)
    monkeypatch.setattr(kit_families, "tiny_batch", grouped_batch)


class TestFEBS(PluginConformance):
    """Entry point, metadata, recipe round trip, objective properties, a few steps, resume,
    2 DDP processes equal 1 (the group losses are reduced before the weights)."""

    name = "febs"


class TestEquityScaledMetric(PluginConformance):
    """The metric plugin: entry point, metadata, metric properties, runs with it, resume."""

    name = "febs-metric"

    @pytest.mark.slow
    def test_two_processes_equal_one(self, tmp_path) -> None:
        pytest.skip(
            "the metric does not change training, so the kit's weight comparison proves nothing "
            "about it; test_metric_over_two_processes_equals_one_process compares its values"
        )


@pytest.mark.slow
def test_febs_on_two_fsdp2_processes_equals_one(tmp_path):
    check_ddp_equals_single("febs", {}, tmp_path, strategy="fsdp2")


@pytest.mark.slow
def test_metric_over_two_processes_equals_one_process(tmp_path):
    # torchmetrics sums the states over ranks: the validation ES-Acc and worst-group accuracy of
    # 2 processes (each holding half of every validation batch) equal those of 1 process
    raw = tiny_recipe(
        [{"name": "febs"}, {"name": "febs-metric"}],
        run_dir=tmp_path / "runs",
        batch_size=64,
        dropout=0.0,
    )
    raw["data"]["groups"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = json.loads((fit_cli(path, ["name=one"], cwd=tmp_path) / "metrics.json").read_text())
    two = json.loads(
        (
            fit_cli(path, ["name=two", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path)
            / "metrics.json"
        ).read_text()
    )
    for key in ("val/es_acc", "val/worst_group_acc", "val/acc"):
        assert key in one, sorted(one)
        assert abs(one[key] - two[key]) < 1e-6, (key, one[key], two[key])
    assert 0 < one["val/es_acc"] <= one["val/acc"]  # ES = overall/(1 + Δ) ≤ overall
