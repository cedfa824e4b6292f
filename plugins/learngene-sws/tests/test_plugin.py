"""The ``learngene-sws`` plugin: kit checks, sharing and merge, teacher → learngene → descendant
through real runs, bit-identical resume, N processes = 1 (slow), and the paper's effect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from paperhooks import recipe as R
from paperhooks.context import StepContext
from paperhooks.reparam import merge, trainable_parameters
from paperhooks.run import fit
from paperhooks.tasks import build_datamodule
from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.conformance import (
    assert_nested_close,
    check_entry_point,
    check_metadata,
    check_recipe_roundtrip,
)
from paperhooks_learngene_sws import (
    LearngeneMLP,
    LearngeneMLPConfig,
    LearngeneSws,
    LearngeneSwsConfig,
    distillation_loss,
    expand,
    learngene_layers,
    load_run_model,
    spread,
    tie_stages,
)

NAME = "learngene-sws"
RECIPE = Path(__file__).parents[3] / "recipes" / "learngene-sws.yaml"


def sws_recipe(
    run_dir: Path,
    plugin: dict[str, Any],
    *,
    name: str,
    model: dict | None = None,
    trainer: dict | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """A small learngene-mlp on digits with AdamW; validation off unless asked."""
    return {
        "seed": 0,
        "name": name,
        "run_dir": str(run_dir),
        "model": {"name": "learngene-mlp", "dim": 16, "depth": 4, "mlp_ratio": 2, **(model or {})},
        "data": {"name": "digits", "batch_size": batch_size},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.05},
        "trainer": {
            "enable_progress_bar": False,
            "max_steps": 6,
            "limit_val_batches": 0,
            **(trainer or {}),
        },
        "plugins": [{"name": NAME, **plugin}],
    }


def _fit(raw: dict[str, Any], resume: Path | None = None):
    return fit(R.validate(raw), resume=None if resume is None else str(resume))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A teacher run (dim 32, 2 blocks, no sharing, cross-entropy, 40 steps): its last.ckpt."""
    run_dir = tmp_path_factory.mktemp("teacher")
    built, _ = _fit(
        sws_recipe(
            run_dir,
            {"stages": []},
            name="teacher",
            model={"dim": 32, "depth": 2},
            trainer={"max_steps": 40},
        )
    )
    return built.run_dir / "checkpoints" / "last.ckpt"


class Holder:
    """What the hooks read of the HookedModule."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


def _plugin(**kw) -> LearngeneSws:
    p = LearngeneSws(LearngeneSwsConfig(**kw))
    p.name = NAME
    return p


def _mlp(depth: int, seed: int = 0, dim: int = 16) -> LearngeneMLP:
    torch.manual_seed(seed)
    return LearngeneMLP(64, 10, LearngeneMLPConfig(dim=dim, depth=depth, mlp_ratio=2))


# -- declarations ----------------------------------------------------------------------------------
def test_entry_point_metadata_and_recipe_round_trip():
    check_metadata(check_entry_point(NAME), NAME)
    check_recipe_roundtrip(
        NAME, {"stages": [2, 2], "alpha": 0.5, "tau": 2.0, "distillation": "hard"}
    )
    check_recipe_roundtrip(
        NAME,
        {
            "stages": [],
            "learngene": "runs/x/last.ckpt",
            "layers_source": [0, 0, 1],
            "load_head": False,
        },
    )


def test_recipe_file_validates():
    recipe = R.load(RECIPE)
    assert [p.name for p in recipe.plugins] == [NAME]
    assert recipe.plugins[0].config == LearngeneSwsConfig(stages=(2, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": (0, 2)}, "stages"),
        ({"alpha": 1.5}, "alpha"),
        ({"tau": 0.0}, "tau"),
        ({"container": ""}, "container"),
        ({"learngene": "x.ckpt"}, "stages must be \\[\\] for a descendant"),
        ({"stages": (), "layers_source": (0,)}, "needs learngene"),
        ({"stages": (), "learngene": "x", "layers_source": (-1,)}, "layers_source"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=f"LearngeneSwsConfig.*{match}"):
        LearngeneSwsConfig(**kwargs)


# -- sharing and merge -------------------------------------------------------------------------------------
def test_setup_shares_blocks_stage_wise_and_merge_unties_them_keeping_the_function():
    model = _mlp(5)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    full = trainable_parameters(model)
    _plugin(stages=(3, 2)).reparam_setup(module=Holder(model), ctx=StepContext())
    assert (
        model.blocks[0] is model.blocks[2]
        and model.blocks[3] is model.blocks[4]
        and model.blocks[2] is not model.blocks[3]
    )
    assert trainable_parameters(model) == full - 3 * block  # 5 blocks stored as 2
    x = torch.randn(9, 1, 8, 8)
    out = model(x)
    merged = merge(model, [_plugin(stages=(3, 2))])
    assert len({id(b) for b in merged.blocks}) == 5 and trainable_parameters(merged) == full
    torch.testing.assert_close(merged(x), out, rtol=0, atol=0)


def test_setup_names_the_container_it_cannot_find():
    with pytest.raises(
        ValueError,
        match=r"no module 'layers' holding its blocks.*children are \['stem', 'blocks', 'norm', 'head'\]",
    ):
        _plugin(container="layers").reparam_setup(module=Holder(_mlp(2)), ctx=StepContext())
    with pytest.raises(
        ValueError, match=r"stages \[3, 3, 4, 3, 3\] need 16 blocks, the model has 2"
    ):
        _plugin().reparam_setup(module=Holder(_mlp(2)), ctx=StepContext())


# -- teacher → learngene → descendant, through real runs -----------------------------------------------------
def test_learngene_training_and_expansion_through_real_runs(tmp_path, teacher):
    # the learngene: 4 blocks in 2 stages of 2, distilled from the teacher
    built, metrics = _fit(
        sws_recipe(
            tmp_path,
            {"stages": [2, 2], "teacher": str(teacher)},
            name="aux",
            trainer={"limit_val_batches": 1},
        )
    )
    path = built.run_dir / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(built.run_dir)  # weights_only=True
    sd = ckpt["state_dict"]
    block_keys = ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "norm.bias", "norm.weight"]
    assert sorted(sd) == sorted(
        [
            "model.stem.weight",
            "model.stem.bias",
            "model.norm.weight",
            "model.norm.bias",
            "model.head.weight",
            "model.head.bias",
        ]
        + [f"model.blocks.{j}.{k}" for j in range(4) for k in block_keys]
    )
    for k in block_keys:  # stages [2, 2]: blocks 0 = 1 and 2 = 3, after training
        assert torch.equal(sd[f"model.blocks.0.{k}"], sd[f"model.blocks.1.{k}"])
        assert torch.equal(sd[f"model.blocks.2.{k}"], sd[f"model.blocks.3.{k}"])
    assert not torch.equal(sd["model.blocks.0.fc1.weight"], sd["model.blocks.2.fc1.weight"])
    (entry,) = ckpt["paperhooks"]["plugins"]
    assert entry == {
        "name": NAME,
        "state": {"stages": [2, 2], "container": "blocks", "layers_source": []},
    }
    block = 2 * 16 + (16 * 32 + 32) + (32 * 16 + 16)
    assert metrics["model/trainable_parameters"] == 2 * block + (64 * 16 + 16) + 2 * 16 + (
        16 * 10 + 10
    )

    # a descendant of 3 blocks: σ = spread(3, 2) = (0, 0, 1); stem, norm and head copied
    child = _mlp(3, seed=7)
    plugin = _plugin(stages=(), learngene=str(path))
    plugin.reparam_setup(module=Holder(child), ctx=StepContext())
    assert plugin.layers_source == (0, 0, 1) == spread(3, 2)
    for j, src in enumerate((0, 0, 2)):
        for k in block_keys:
            assert torch.equal(child.blocks[j].state_dict()[k], sd[f"model.blocks.{src}.{k}"]), (
                j,
                k,
            )
    for k, v in child.state_dict().items():
        if not k.startswith("blocks."):
            assert torch.equal(v, sd[f"model.{k}"]), k
    # and one with its own σ, a fresh head
    other = _mlp(5, seed=8)
    head = other.head.weight.clone()
    _plugin(
        stages=(), learngene=str(path), layers_source=(1, 1, 0, 0, 1), load_head=False
    ).reparam_setup(module=Holder(other), ctx=StepContext())
    assert torch.equal(other.blocks[0].fc2.weight, sd["model.blocks.2.fc2.weight"]) and torch.equal(
        other.head.weight, head
    )

    # the descendant trains through a real run, from the learngene
    run, m = _fit(
        sws_recipe(
            tmp_path,
            {"stages": [], "learngene": str(path)},
            name="child",
            model={"depth": 6},
            trainer={"max_steps": 2},
        )
    )
    child_ckpt = load_checkpoint(run.run_dir)
    assert child_ckpt["paperhooks"]["plugins"][0]["state"]["layers_source"] == [0, 0, 0, 1, 1, 1]
    assert m["model/trainable_parameters"] == 6 * block + (64 * 16 + 16) + 2 * 16 + (16 * 10 + 10)


def test_the_objective_is_the_distillation_loss_against_the_teacher(teacher):
    model = _mlp(4)
    plugin = _plugin(stages=(2, 2), teacher=str(teacher), alpha=0.7, tau=2.0)
    plugin.reparam_setup(module=Holder(model), ctx=StepContext())
    data = build_datamodule("digits", None, seed=0).train_set.tensors
    batch = {"input": data["input"][:32], "target": data["target"][:32]}
    logits = model(batch["input"])
    terms = plugin.objective_terms(
        module=Holder(model), batch=batch, outputs={"logits": logits}, ctx=StepContext()
    )
    with torch.no_grad():
        z_t = load_run_model(teacher)(batch["input"])
    torch.testing.assert_close(
        terms["loss"], distillation_loss(logits, z_t, batch["target"], alpha=0.7, tau=2.0)
    )
    assert not torch.allclose(
        terms["loss"], F.cross_entropy(logits, batch["target"], reduction="none")
    )


def test_resume_of_a_shared_distilled_run_is_bit_identical(tmp_path, teacher):
    raw = sws_recipe(
        tmp_path,
        {"stages": [2, 2], "teacher": str(teacher)},
        name="full",
        trainer={"max_steps": 16, "checkpoint_every_n_steps": 13},
    )
    full, _ = _fit(raw)
    end, mid = load_checkpoint(full.run_dir), load_checkpoint(full.run_dir, "step13.ckpt")
    assert mid["global_step"] == 13 and end["global_step"] == 16
    assert not torch.equal(
        mid["state_dict"]["model.blocks.0.fc1.weight"],
        end["state_dict"]["model.blocks.0.fc1.weight"],
    )
    resumed, _ = _fit(
        {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / "step13.ckpt"
    )
    again = load_checkpoint(resumed.run_dir)
    assert again["global_step"] == 16
    assert_states_close(end["state_dict"], again["state_dict"], atol=0)
    assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
    assert_nested_equal(
        end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
    )


def _many_equals_one(tmp_path: Path, teacher: Path, strategy: str) -> None:
    raw = sws_recipe(
        tmp_path / "runs",
        {"stages": [2, 2], "teacher": str(teacher), "alpha": 0.5, "tau": 2.0},
        name="one",
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    one = load_checkpoint(fit_cli(path, ["name=one"], cwd=tmp_path))
    many = load_checkpoint(
        fit_cli(
            path,
            [f"name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}"],
            cwd=tmp_path,
        )
    )
    assert one["global_step"] == many["global_step"] == 6
    assert_states_close(one["state_dict"], many["state_dict"], atol=1e-6, rtol=1e-5)
    assert_nested_close(
        one["paperhooks"]["plugins"],
        many["paperhooks"]["plugins"],
        "plugin states",
        atol=1e-6,
        rtol=1e-5,
    )
    for k in ("fc1.weight", "fc2.bias", "norm.weight"):  # still shared after the steps
        assert torch.equal(
            many["state_dict"][f"model.blocks.0.{k}"], many["state_dict"][f"model.blocks.1.{k}"]
        )


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_on_the_global_batch(tmp_path, teacher):
    _many_equals_one(tmp_path, teacher, "ddp")


@pytest.mark.slow
def test_two_fsdp2_processes_equal_one_process_on_the_global_batch(tmp_path, teacher):
    _many_equals_one(tmp_path, teacher, "fsdp2")


# -- the paper's effect --------------------------------------------------------------------------------------
def _accuracy(model: nn.Module, val: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(val["input"]).argmax(1) == val["target"]).float().mean().item()
    model.train()
    return acc


def _train(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    steps: int,
    seed: int,
    teacher: nn.Module | None = None,
    lr: float = 3e-3,
    batch: int = 128,
) -> None:
    """AdamW (wd 0.05) on the loss of ``distillation_loss`` (α = 1, T = 1 with a teacher; CE without)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    n = len(data["target"])
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch // n + 1)])
    for t in range(steps):
        idx = order[t * batch : (t + 1) * batch]
        x = data["input"][idx]
        z_t = None
        if teacher is not None:
            with torch.no_grad():
                z_t = teacher(x)
        opt.zero_grad()
        distillation_loss(model(x), z_t, data["target"][idx]).mean().backward()
        opt.step()


def sws_effect(
    seed: int,
    depths=(3, 4, 8),
    *,
    teacher_steps: int = 110,
    aux_steps: int = 110,
    tune_steps: int = 11,
    load_head: bool = True,
    lr: float = 3e-3,
    tune_lr: float = 3e-4,
    teacher_dim: int = 128,
) -> dict[str, Any]:
    """Teacher (dim 128, 4 blocks, CE) → learngene (dim 64, 6 blocks in stages [2, 2, 2],
    soft distillation α = 1, T = 1) → descendants of each depth initialized by expansion (σ =
    spread) or at random, both then trained ``tune_steps`` steps with the same data order."""
    data = build_datamodule("digits", {"batch_size": 128}, seed=seed)
    train, val = data.train_set.tensors, data.val_set.tensors
    torch.manual_seed(100 + seed)
    teacher = LearngeneMLP(64, 10, LearngeneMLPConfig(dim=teacher_dim, depth=4))
    _train(teacher, train, teacher_steps, seed, lr=lr)
    teacher.eval()
    torch.manual_seed(200 + seed)
    aux = LearngeneMLP(64, 10, LearngeneMLPConfig(dim=64, depth=6))
    tie_stages(aux.blocks, (2, 2, 2))
    _train(aux, train, aux_steps, seed, teacher=teacher, lr=lr)
    state = {f"model.{k}": v for k, v in aux.state_dict().items()}
    gene = learngene_layers(state, "model.blocks.", (2, 2, 2))
    parts = ("stem", "norm", "head") if load_head else ("stem", "norm")
    out: dict[str, Any] = {"teacher": _accuracy(teacher, val), "aux": _accuracy(aux, val)}
    for depth in depths:
        models = []
        for _ in range(3):  # the same random init three times
            torch.manual_seed(300 + seed + depth)
            models.append(LearngeneMLP(64, 10, LearngeneMLPConfig(dim=64, depth=depth)))
        grown, parts_only, scratch = models
        expand(gene, grown.blocks, spread(depth, 3))
        for p in parts:  # the ablation copies these too, but keeps its random blocks
            getattr(grown, p).load_state_dict(getattr(aux, p).state_dict())
            getattr(parts_only, p).load_state_dict(getattr(aux, p).state_dict())
        _train(grown, train, tune_steps, seed, lr=tune_lr)
        _train(parts_only, train, tune_steps, seed, lr=tune_lr)
        _train(scratch, train, tune_steps, seed, lr=lr)
        out[depth] = (_accuracy(grown, val), _accuracy(scratch, val), _accuracy(parts_only, val))
    return out


def test_descendants_grown_from_the_learngene_beat_random_init_after_one_epoch():
    """The paper's claim, in direction: descendants of 3, 4 and 8 blocks initialized from a
    6-block learngene (3 stages of 2 shared blocks, distilled from a teacher) are more accurate
    after one epoch (11 steps of 128) than the same architectures from random init, on every
    seed. As in the code's README, descendants are tuned at a tenth of the learning rate the
    models from scratch train with (3e-4 vs 3e-3, AdamW, wd 0.05).

    The ablation "parts only" copies the stem, final norm and head but keeps random blocks:
    most of the gain over random init comes from those parts; the learngene blocks add the
    rest, on every (seed, depth).

    Measured (torch 2.14.1, CPU), validation accuracy grown / random / parts only, 11 steps:
    seed 0: L3 .972 / .900 / .955, L4 .969 / .858 / .958, L8 .967 / .919 / .958;
    seed 1: L3 .967 / .844 / .953, L4 .967 / .783 / .958, L8 .975 / .783 / .933;
    seed 2: L3 .958 / .855 / .933, L4 .964 / .872 / .936, L8 .967 / .788 / .939.
    """
    over_random, over_parts = [], []
    for seed in range(3):
        res = sws_effect(seed)
        for depth in (3, 4, 8):
            grown, scratch, parts_only = res[depth]
            assert grown > scratch and grown > 0.9, (seed, depth, res)
            assert grown > parts_only, (seed, depth, res)
            over_random.append(grown - scratch)
            over_parts.append(grown - parts_only)
    assert sum(over_random) / 9 > 0.05 and sum(over_parts) / 9 > 0.01, (over_random, over_parts)
