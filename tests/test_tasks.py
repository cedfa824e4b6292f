"""Tests of the built-in tasks: registry, models, datasets, and the sharded batch sampler."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from paperhooks.tasks import (
    DATASETS,
    MODELS,
    DataInfo,
    DigitsConfig,
    LabelNoise,
    MLPConfig,
    PaperhooksDataModule,
    ShardedBatchSampler,
    build_datamodule,
    build_model,
)
from paperhooks.tasks.data import _noisy_labels

DIGITS = DataInfo("classification", 10, (1, 8, 8))


def fake_trainer(rank: int = 0, world: int = 1) -> types.SimpleNamespace:
    """What the datamodule reads from a trainer, for simulated ranks (no progress yet)."""
    total = types.SimpleNamespace(processed=0)
    fit_loop = types.SimpleNamespace(
        epoch_loop=types.SimpleNamespace(batch_progress=types.SimpleNamespace(total=total))
    )
    return types.SimpleNamespace(
        global_rank=rank,
        world_size=world,
        current_epoch=0,
        limit_train_batches=1.0,
        fit_loop=fit_loop,
    )


def batches(sampler: ShardedBatchSampler) -> list[list[int]]:
    return list(iter(sampler))


# --- sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_union_over_ranks_is_the_one_process_batch(world: int) -> None:
    n, g = 103, 8
    for epoch in (0, 1):
        one = ShardedBatchSampler(n, g, seed=7, rank=0, world_size=1, shuffle=True, drop_last=True)
        one.set_epoch(epoch)
        ranks = [ShardedBatchSampler(n, g, 7, r, world, True, True) for r in range(world)]
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [batches(s) for s in ranks]
        assert all(len(p) == len(one) == n // g for p in per_rank)
        for b, global_batch in enumerate(batches(one)):
            assert sum((p[b] for p in per_rank), []) == global_batch
            assert all(len(p[b]) == g // world for p in per_rank)


def test_epochs_differ_and_seed_fixes_the_order() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        s = ShardedBatchSampler(64, 8, seed, 0, 1, shuffle=True, drop_last=True)
        s.set_epoch(epoch)
        return sum(batches(s), [])

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert sorted(order(1, 1)) == list(range(64))
    expected = torch.randperm(64, generator=torch.Generator().manual_seed(1 * 1000003 + 1)).tolist()
    assert order(1, 1) == expected


def test_progress_skips_the_batches_already_done() -> None:
    reference = ShardedBatchSampler(100, 6, 3, 1, 2, True, True)
    reference.set_epoch(1)
    full = batches(reference)
    resumed = ShardedBatchSampler(
        100, 6, 3, 1, 2, True, True, progress=lambda: (1, len(reference) + 3)
    )
    assert batches(resumed) == full[3:]
    fresh = ShardedBatchSampler(100, 6, 3, 1, 2, True, True, progress=lambda: (1, len(reference)))
    assert batches(fresh) == full


def test_validation_split_is_unshuffled_complete_and_may_be_uneven() -> None:
    samplers = [
        ShardedBatchSampler(10, 4, 0, r, 3, shuffle=False, drop_last=False) for r in range(3)
    ]
    per_rank = [batches(s) for s in samplers]
    assert all(len(p) == 3 for p in per_rank)
    assert [sum((p[b] for p in per_rank), []) for b in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]


def test_datamodule_ranks_see_the_global_batch_rows() -> None:
    dm = build_datamodule("digits", {"batch_size": 32, "groups": 2}, seed=5)
    dm.trainer = fake_trainer()
    one = list(dm.train_dataloader())
    shards = []
    for r in range(2):
        dm.trainer = fake_trainer(r, 2)
        assert dm.per_process_batch_size() == 16
        shards.append(list(dm.train_dataloader()))
    assert len(one) == len(dm.train_set) // 32
    for b, batch in enumerate(one):
        for key, value in batch.items():
            assert torch.equal(torch.cat([shards[0][b][key], shards[1][b][key]]), value)
    assert torch.equal(one[0]["input"], dm.train_set.tensors["input"][one[0]["index"]])
    dm.trainer = fake_trainer(0, 3)
    with pytest.raises(ValueError, match="data.batch_size"):
        dm.train_dataloader()


# --- datasets ---------------------------------------------------------------------------------


def test_digits_defaults_and_determinism() -> None:
    dm = build_datamodule("digits", None, seed=0)
    assert dm.info == DIGITS
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert abs(len(dm.val_set) / 1797 - 0.2) < 0.01
    val_counts = torch.bincount(dm.val_set.tensors["target"], minlength=10)
    assert val_counts.min() >= 34 and val_counts.max() <= 38  # stratified
    x = dm.train_set.tensors["input"]
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert set(dm.train_set.tensors) == {"input", "target", "index"}
    assert dm.train_set[5]["index"] == 5
    again, other = (
        build_datamodule("digits", None, seed=0),
        build_datamodule("digits", None, seed=1),
    )
    assert torch.equal(again.train_set.tensors["input"], x)
    assert not torch.equal(other.train_set.tensors["target"], dm.train_set.tensors["target"])
    big = build_datamodule("digits", {"image_size": 16}, seed=0)
    assert big.info.input_shape == (1, 16, 16)
    assert big.train_set.tensors["input"].shape[1:] == (1, 16, 16)


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_label_noise(kind: str) -> None:
    clean = build_datamodule("digits", None, seed=2).train_set.tensors
    noisy = build_datamodule(
        "digits", {"label_noise": {"kind": kind, "rate": 0.3}}, seed=2
    ).train_set.tensors
    assert torch.equal(noisy["clean_target"], clean["target"])
    flipped = noisy["target"] != noisy["clean_target"]
    assert abs(flipped.float().mean().item() - 0.3) < 0.05
    if kind == "pairflip":
        assert torch.equal(noisy["target"][flipped], (noisy["clean_target"][flipped] + 1) % 10)
    dm = build_datamodule("digits", {"label_noise": {"kind": kind, "rate": 0.3}}, seed=2)
    val = dm.val_set.tensors
    assert torch.equal(val["clean_target"], val["target"])


def test_symmetric_noise_goes_uniformly_to_another_class() -> None:
    y = torch.arange(100_000) % 10
    noisy = _noisy_labels(y, LabelNoise("symmetric", 0.5), 10, torch.Generator().manual_seed(0))
    flipped = noisy != y
    assert abs(flipped.float().mean().item() - 0.5) < 0.01
    offsets = torch.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10).float()
    assert offsets[0] == 0
    assert (offsets[1:] / offsets[1:].mean() - 1).abs().max() < 0.05


def test_imbalance_and_duplicates() -> None:
    dm = build_datamodule("digits", {"imbalance": 10.0}, seed=0)
    counts = torch.bincount(dm.train_set.tensors["target"], minlength=10).float()
    assert abs(counts.max() / counts.min() / 10.0 - 1) < 0.15
    assert counts[0] > counts[5] > counts[9]
    base = len(dm.train_set)
    cfg = {"imbalance": 10.0, "duplicates": {"fraction": 0.1, "copies": 3, "jitter": 0.01}}
    dup = build_datamodule("digits", cfg, seed=0)
    assert len(dup.train_set) == base + round(0.1 * base) * 3
    assert int(dup.redundant.sum()) == round(0.1 * base) * 4
    copies = dup.train_set.tensors["input"][base:]
    originals = dup.train_set.tensors["input"][:base][dup.redundant[:base]]
    nearest = torch.cdist(copies.flatten(1), originals.flatten(1)).min(dim=1).values
    assert nearest.max() < 0.01 * 8 * 3  # within a few jitter stds per pixel
    assert copies.min() >= 0 and copies.max() <= 1


def test_train_classes_keep_the_split_and_leave_the_other_digits_for_calibration() -> None:
    full = build_datamodule("digits", {}, seed=3)
    dm = build_datamodule("digits", {"train_classes": [5, 7]}, seed=3)
    t, ft = dm.train_set.tensors, full.train_set.tensors
    keep = (ft["target"] == 5) | (ft["target"] == 7)
    assert torch.equal(t["input"], ft["input"][keep])  # the same rows, in the same order
    assert torch.equal(t["target"], ft["target"][keep])
    assert len(dm.redundant) == len(dm.train_set)
    assert torch.equal(dm.val_set.tensors["input"], full.val_set.tensors["input"])  # every digit
    pool = dm.calibration_set.tensors  # the training split, the other digits included
    assert torch.equal(pool["input"], ft["input"]) and torch.equal(pool["target"], ft["target"])
    assert dm.info.train_classes == (5, 7) and full.info.train_classes == ()
    assert full.calibration_set is full.train_set
    for bad in ([10], [1, 1], [-1]):
        with pytest.raises(ValueError, match="train_classes"):
            build_datamodule("digits", {"train_classes": bad}, seed=0)


def test_validation_accuracy_on_the_trained_and_the_other_classes_hand_counted(tmp_path) -> None:
    """A model that always answers 1: digits 0 and 1 are trained (train_classes), so the
    trained-class accuracy is n₁ / (n₀ + n₁), the other classes' 0, val/acc n₁ / n."""
    from paperhooks import recipe as R
    from paperhooks.run import build

    raw = {
        "name": "split-acc",
        "model": {"name": "linear"},
        "data": {"name": "digits", "train_classes": [0, 1], "batch_size": 32},
        "trainer": {"max_steps": 1, "enable_progress_bar": False},
        "run_dir": str(tmp_path),
    }
    built = build(R.validate(raw))
    with torch.no_grad():
        layer = next(m for m in built.module.model.modules() if isinstance(m, torch.nn.Linear))
        layer.weight.zero_()
        layer.bias.copy_(torch.nn.functional.one_hot(torch.tensor(1), 10).float())
    built.trainer.validate(built.module, datamodule=built.datamodule, verbose=False)
    y = built.datamodule.val_set.tensors["target"]
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())
    got = {k: float(v) for k, v in built.trainer.callback_metrics.items()}
    assert got["val/acc_train_classes"] == pytest.approx(n1 / (n0 + n1))
    assert got["val/acc_other_classes"] == 0.0
    assert got["val/acc"] == pytest.approx(n1 / len(y))


def test_groups_correlate_with_labels() -> None:
    dm = build_datamodule("digits", {"groups": 3, "group_majority": 0.9}, seed=0)
    for ds in (dm.train_set, dm.val_set):
        t = ds.tensors
        assert t["group"].min() >= 0 and t["group"].max() < 3
        agree = (t["group"] == t["target"] % 3).float().mean().item()
        assert abs(agree - 0.9) < 0.035


def test_regression() -> None:
    dm = build_datamodule("regression", {"redundant_fraction": 0.25, "dim": 4}, seed=0)
    assert dm.info == DataInfo("regression", 0, (4,))
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (64,)
    assert int(dm.redundant.sum()) == 128
    assert len(torch.unique(dm.train_set.tensors["input"][dm.redundant], dim=0)) == 8
    x, y = dm.val_set.tensors["input"], dm.val_set.tensors["target"]
    beta = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    assert (x @ beta - y).std() < 0.15  # noise 0.1: linear with small residual


# --- models, registry, validation --------------------------------------------------------------


def test_every_model_builds_with_the_right_output_shape() -> None:
    x = torch.rand(5, 1, 8, 8)
    assert {"timm", "mlp", "linear"} <= set(MODELS)
    for name in (
        "timm",
        "mlp",
        "linear",
    ):  # the built-ins (plugins may register task-specific models)
        cfg = {"arch": "test_resnet"} if name == "timm" else None
        assert build_model(name, cfg, DIGITS)(x).shape == (5, 10)
    reg = DataInfo("regression", 0, (16,))
    for name in ("mlp", "linear"):
        assert build_model(name, None, reg)(torch.rand(5, 16)).shape == (5,)
    mlp = build_model("mlp", MLPConfig(hidden=(32, 16), dropout=0.1), DIGITS)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [32, 16, 10]


def test_configs_come_from_plain_or_omegaconf_mappings() -> None:
    from omegaconf import OmegaConf

    recipe = OmegaConf.create(
        {"model": {"hidden": [8, 4]}, "data": {"label_noise": {"kind": "pairflip"}}}
    )
    mlp = build_model("mlp", recipe.model, DIGITS)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [8, 4, 10]
    dm = build_datamodule("digits", recipe.data, 0)
    assert "clean_target" in dm.train_set.tensors
    assert build_model("linear", {}, DIGITS)(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_bad_names_list_close_matches() -> None:
    with pytest.raises(ValueError, match=r"resnet_18.*resnet18"):
        build_model("timm", {"arch": "resnet_18"}, DIGITS)
    with pytest.raises(ValueError, match="did you mean 'timm'"):
        build_model("tim", None, DIGITS)
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        build_datamodule("digit", None, 0)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: LabelNoise("symmetric", 1.5), "label_noise.rate"),
        (lambda: LabelNoise("bogus", 0.1), "label_noise.kind"),  # type: ignore[arg-type]
        (lambda: DigitsConfig(batch_size=0), "batch_size"),
        (
            lambda: build_datamodule("digits", {"duplicates": {"copies": -1}}, 0),
            "duplicates.copies",
        ),
        (lambda: build_datamodule("digits", {"group_majority": 2.0}, 0), "group_majority"),
        (lambda: build_datamodule("digits", {"batchsize": 2}, 0), "batchsize"),
        (
            lambda: build_datamodule("regression", {"redundant_fraction": -0.1}, 0),
            "redundant_fraction",
        ),
        (lambda: MLPConfig(dropout=1.0), "dropout"),
    ],
)
def test_validation_errors_name_the_field(make: typing.Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def _allowed(tp: object) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (int, float, str, bool) or origin is typing.Literal:
        return True
    if origin is tuple:
        return args == (int, ...)
    if origin is types.UnionType:
        return (
            len(args) == 2
            and type(None) in args
            and all(_allowed(a) for a in args if a is not type(None))
        )
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and _config_ok(tp)


def _config_ok(cls: type) -> bool:
    frozen = cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    return frozen and all(_allowed(tp) for tp in typing.get_type_hints(cls).values())


def test_configs_use_only_validatable_field_types() -> None:
    for entry in [*MODELS.values(), *DATASETS.values()]:
        assert _config_ok(entry.config_cls), entry.name
        entry.config_cls()  # the defaults are valid


# --- under Lightning ---------------------------------------------------------------------------


class Recorder(pl.LightningModule):
    def __init__(self, info: DataInfo) -> None:
        super().__init__()
        self.net = build_model("mlp", None, info)
        self.seen: list[list[int]] = []
        self.val_rows = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return torch.nn.functional.cross_entropy(self.net(batch["input"]), batch["target"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_rows += len(batch["index"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kw: typing.Any) -> pl.Trainer:
    base = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**base, **kw})


def test_lightning_fit_uses_the_sharded_loaders() -> None:
    dm = build_datamodule("digits", None, seed=0)
    model = Recorder(dm.info)
    _trainer(max_epochs=1).fit(model, datamodule=dm)
    sampler = ShardedBatchSampler(len(dm.train_set), 64, 0, 0, 1, shuffle=True, drop_last=True)
    assert model.seen == batches(sampler)
    assert model.val_rows == len(dm.val_set)


def _expected(dm: PaperhooksDataModule, epoch: int) -> list[list[int]]:
    sampler = ShardedBatchSampler(len(dm.train_set), dm.batch_size, dm.seed, 0, 1, True, True)
    sampler.set_epoch(epoch)
    return batches(sampler)


@pytest.mark.filterwarnings("ignore:.*ckpt_path.*callbacks:UserWarning")
@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
def test_lightning_mid_epoch_resume_yields_the_remaining_batches(tmp_path: Path) -> None:
    # 22 batches per epoch with accumulation 4: epochs end on a partial accumulation, so
    # step 9 is 6 steps of epoch 0 (22 batches) and 3 steps (12 batches) into epoch 1
    dm = build_datamodule("digits", None, seed=3)
    part, resumed = Recorder(dm.info), Recorder(dm.info)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=9, save_top_k=-1, filename="{step}"
    )
    _trainer(
        max_steps=9,
        accumulate_grad_batches=4,
        enable_checkpointing=True,
        callbacks=[ckpt],
        limit_val_batches=0,
    ).fit(part, datamodule=dm)
    _trainer(max_epochs=2, accumulate_grad_batches=4, limit_val_batches=0).fit(
        resumed, datamodule=dm, ckpt_path=tmp_path / "step=9.ckpt"
    )
    assert part.seen == _expected(dm, 0) + _expected(dm, 1)[:12]
    assert resumed.seen == _expected(dm, 1)[12:]


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable")
def test_lightning_resume_after_max_steps_finishes_the_interrupted_epoch(tmp_path: Path) -> None:
    # Lightning saves an epoch stopped by max_steps as finished (current_epoch + 1); the data
    # order must still continue inside the interrupted epoch.
    dm = build_datamodule("digits", None, seed=3)
    part, resumed = Recorder(dm.info), Recorder(dm.info)
    last = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(max_steps=5, limit_val_batches=0, enable_checkpointing=True, callbacks=[last]).fit(
        part, datamodule=dm
    )
    _trainer(max_steps=25, limit_val_batches=0).fit(
        resumed, datamodule=dm, ckpt_path=tmp_path / "last.ckpt"
    )
    assert part.seen + resumed.seen == _expected(dm, 0) + _expected(dm, 1)[:3]


# -- tasks registered by plugin distributions (entry-point group paperhooks.tasks) -----------------
def test_plugin_tasks_register_through_their_entry_point_and_a_broken_one_is_named(
    tmp_path, monkeypatch
) -> None:
    """Installed plugins' task modules register on the first lookup, so a recipe may use a
    plugin's dataset without naming the plugin; a task module that fails to import is named in
    the unknown-name error and does not stop the others."""
    import subprocess
    import sys

    from paperhooks import recipe as R
    from paperhooks.tasks import registry

    # listing plugins imports no task module, so no Lightning, and no metric class, so no
    # torchmetrics (a fresh interpreter)
    code = (
        "import sys\nfrom paperhooks import discovery\n"
        "for name in discovery.entry_points(): discovery.load(name)\n"
        "print(sorted(m for m in ('lightning', 'paperhooks.tasks.data', 'paperhooks_more.tasks', 'torchmetrics') if m in sys.modules))\n"
        # validating every shipped recipe loads every task module (the configs) but still no
        # Lightning, timm, transformers or torchmetrics: those load when a run builds them
        "import glob\nfrom paperhooks import recipe as R\n"
        "for f in sorted(glob.glob('recipes/*.yaml')): R.load(f)\n"
        "print(sorted(m for m in ('lightning', 'timm', 'transformers', 'torchmetrics', 'paperhooks.tasks.datamodule') if m in sys.modules))\n"
        "print(all(m in sys.modules for m in ('paperhooks.tasks.data', 'paperhooks_more.tasks', 'paperhooks_pareto_da.tasks')))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    assert out.split() == ["[]", "[]", "True"], out

    # a recipe uses rerank-curriculum's dataset without naming the plugin
    rec = R.validate(
        {
            "model": {"name": "mlp"},
            "data": {"name": "digits-difficulty"},
            "trainer": {"max_steps": 1},
        }
    )
    assert rec.data.name == "digits-difficulty"

    site = tmp_path / "site"
    (site / "broken_tasks.py").parent.mkdir(parents=True)
    (site / "broken_tasks.py").write_text(
        "raise ImportError('needs a library that is not installed')\n"
    )
    info = site / "paperhooks_broken-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: paperhooks-broken\nVersion: 0.0.1\n"
    )
    (info / "entry_points.txt").write_text("[paperhooks.tasks]\nbroken = broken_tasks\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_plugin_tasks_loaded", False)
    monkeypatch.setattr(registry, "TASK_ERRORS", {})
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'nope'.*tasks that failed to load: broken \(paperhooks-broken: ImportError: needs a library",
    ):
        build_datamodule("nope", None, 0)
    assert "digits-difficulty" in registry.DATASETS  # the others registered


def test_every_registered_dataset_declares_its_task_and_builds_it(monkeypatch) -> None:
    from paperhooks.tasks import registry

    registry.load_tasks()
    # each one declares the kind of data it builds: `paperhooks validate` checks plugins against it
    assert {k: v.task for k, v in registry.DATASETS.items() if v.task is None} == {}
    assert registry.DATASETS["digits"].task == "classification"
    assert registry.DATASETS["synthetic-preferences"].task == "preference"
    with pytest.raises(
        ValueError,
        match=r"dataset 'x': task must be one of classification, regression, preference, got 'text'",
    ):
        registry.register_dataset("x", registry.DATASETS["digits"].config_cls, task="text")
    # a declaration that does not match the build is the registering author's error
    monkeypatch.setitem(
        registry.DATASETS,
        "digits",
        dataclasses.replace(registry.DATASETS["digits"], task="regression"),
    )
    with pytest.raises(
        ValueError,
        match="dataset 'digits' is registered as regression data but built classification data",
    ):
        build_datamodule("digits", None, 0)
