"""Recipe validation: every error class names the key, plugin or strategy and what is allowed."""

from __future__ import annotations

import huggingface_hub.constants  # noqa: F401 - imported before any test sets HF_HUB_OFFLINE
import pytest

from paperhooks import recipe as R
from paperhooks.errors import (
    ConfigKeyError,
    ConfigTypeError,
    IncompatiblePluginsError,
    PluginLoadError,
    RecipeError,
    UnknownPluginError,
    UnsupportedStrategyError,
)

BASE = """
seed: 1
model: {name: mlp, hidden: [16]}
data: {name: digits, batch_size: 32}
trainer: {max_steps: 3}
"""


def load(tmp_path, text, overrides=()):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return R.load(p, overrides)


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load(tmp_path, BASE)
    assert r.seed == 1 and r.model.config.hidden == (16,)
    assert r.optimizer.name == "sgd" and r.trainer.strategy_kind == "single"


def test_unknown_plugin_suggests_installed_name(tmp_path, test_plugins):
    with pytest.raises(
        UnknownPluginError, match=r"unknown plugin 'class-wieght' \(did you mean 'class-weight'\?\)"
    ):
        load(tmp_path, BASE + "plugins: [{name: class-wieght}]")


def test_unknown_known_paper_plugin_gives_pip_line(tmp_path):
    from paperhooks._known import KNOWN_PLUGINS
    from paperhooks.discovery import entry_points

    name = sorted(KNOWN_PLUGINS - set(entry_points()))[0]  # a paper plugin that is not installed
    with pytest.raises(UnknownPluginError, match=f"pip install paperhooks-{name}"):
        load(tmp_path, BASE + f"plugins: [{{name: {name}}}]")


def test_unknown_plugin_key_names_key_and_allowed(tmp_path, test_plugins):
    with pytest.raises(ConfigKeyError) as e:
        load(tmp_path, BASE + "plugins: [{name: class-weight, factr: 3}]")
    msg = str(e.value)
    assert "plugins[0] (class-weight).factr" in msg and "did you mean 'factor'" in msg
    assert "allowed keys: cls: int, factor: float" in msg


def test_unknown_top_level_and_section_keys(tmp_path):
    with pytest.raises(
        ConfigKeyError, match="unknown top-level key 'trainr'.*did you mean 'trainer'"
    ):
        load(tmp_path, BASE + "trainr: {}")
    with pytest.raises(
        ConfigKeyError, match=r"unknown key trainer\.max_epoch .*did you mean 'max_epochs'"
    ):
        load(tmp_path, BASE, ["trainer.max_epoch=2"])


def test_ill_typed_value_names_key_and_type(tmp_path, test_plugins):
    with pytest.raises(
        ConfigTypeError, match=r"plugins\[0\] \(class-weight\)\.factor must be float, got str 'big'"
    ):
        load(tmp_path, BASE + "plugins: [{name: class-weight, factor: big}]")
    with pytest.raises(
        ConfigTypeError,
        match=r"optimizer\.name must be one of 'sgd' \| 'adam' \| 'adamw', got 'adan'",
    ):
        load(tmp_path, BASE + "optimizer: {name: adan}")
    with pytest.raises(ConfigTypeError, match=r"model\.name 'resnet' is not registered"):
        load(tmp_path, BASE.replace("name: mlp, hidden: [16]", "name: resnet"))


def test_invalid_value_from_post_init_names_section(tmp_path, test_plugins):
    with pytest.raises(
        ConfigTypeError, match=r"plugins\[0\] \(class-weight\): factor must be >= 0"
    ):
        load(tmp_path, BASE + "plugins: [{name: class-weight, factor: -1}]")


def test_incompatible_plugins_named_with_reason(tmp_path, test_plugins):
    text = BASE + "plugins: [{name: class-weight}, {name: conflicting}]"
    with pytest.raises(
        IncompatiblePluginsError,
        match="'conflicting' and 'class-weight' cannot be combined: both rescale",
    ):
        load(tmp_path, text)


def test_unsupported_strategy_names_plugin_and_strategy(tmp_path, test_plugins):
    text = BASE + "plugins: [{name: no-ddp}]"
    load(tmp_path, text)  # fine on one process
    with pytest.raises(
        UnsupportedStrategyError,
        match="plugin 'no-ddp' does not support strategy 'ddp'; it supports: single",
    ):
        load(tmp_path, text, ["trainer.devices=2"])


def test_core_refuses_a_family_it_cannot_run_under_a_strategy(tmp_path, test_plugins):
    text = BASE + "plugins: [{name: sum-surgery}]"
    with pytest.raises(
        UnsupportedStrategyError,
        match="'sum-surgery' \\(gradient-surgery\\) cannot run under strategy 'fsdp2'",
    ):
        load(tmp_path, text, ["trainer.devices=2", "trainer.strategy=fsdp2"])


def test_cuda_only_strategy_refused_on_cpu(tmp_path):
    with pytest.raises(UnsupportedStrategyError, match="'fsdp' needs CUDA.*use 'ddp' or 'fsdp2'"):
        load(tmp_path, BASE, ["trainer.strategy=fsdp", "trainer.devices=2"])


def test_plugin_that_fails_to_import_is_named_with_distribution(tmp_path, test_plugins):
    from helpers import write_distribution

    write_distribution(test_plugins, "paperhooks-broken", {"broken": "no_such_module_xyz:Plugin"})
    with pytest.raises(
        PluginLoadError,
        match="plugin 'broken' from distribution paperhooks-broken 0.0.1 failed to import: ModuleNotFoundError",
    ):
        load(tmp_path, BASE + "plugins: [{name: broken}]")
    load(tmp_path, BASE + "plugins: [{name: class-weight}]")  # a recipe that does not use it works


def test_two_distributions_claiming_one_name(tmp_path, test_plugins):
    from helpers import write_distribution

    write_distribution(
        test_plugins, "paperhooks-impostor", {"class-weight": "paperhooks_testplugins:NoDDP"}
    )
    with pytest.raises(
        PluginLoadError,
        match="'class-weight' is claimed by two distributions: .*paperhooks-.*and paperhooks-",
    ):
        load(tmp_path, BASE)


def test_overrides_reach_plugins_by_name_and_index(tmp_path, test_plugins):
    text = BASE + "plugins: [{name: class-weight}]"
    r = load(tmp_path, text, ["plugins.class-weight.factor=5", "trainer.max_steps=7"])
    assert r.plugins[0].config.factor == 5.0 and r.trainer.max_steps == 7
    r = load(tmp_path, text, ["plugins.0.cls=3"])
    assert r.plugins[0].config.cls == 3
    with pytest.raises(RecipeError, match="no plugin 'nope'"):
        load(tmp_path, text, ["plugins.nope.x=1"])
    with pytest.raises(RecipeError, match="must look like key=value"):
        load(tmp_path, text, ["trainer.max_steps"])


def test_recipe_is_data_not_code(tmp_path):
    # a dotted path where a registered name is expected is just an unknown name
    with pytest.raises(ConfigTypeError, match="is not registered"):
        load(tmp_path, BASE.replace("name: mlp, hidden: [16]", "name: os.system"))
    with pytest.raises(ConfigTypeError, match=r"model\.name 'torch\.nn\.Linear' is not registered"):
        load(tmp_path, BASE.replace("name: mlp, hidden: [16]", "name: torch.nn.Linear"))


def test_recipe_from_hugging_face_hub_cache(tmp_path, monkeypatch):
    """hf://owner/repo/path.yaml resolves through huggingface_hub from a prepared offline cache."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--recipes" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "digits.yaml").write_text(BASE)
    (cache / "models--someone--recipes" / "refs").mkdir()
    (cache / "models--someone--recipes" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    r = R.load("hf://someone/recipes/digits.yaml", ["seed=4"])
    assert r.seed == 4 and r.model.name == "mlp"
    with pytest.raises(RecipeError, match="cannot fetch recipe hf://someone/recipes/missing.yaml"):
        R.load("hf://someone/recipes/missing.yaml")
