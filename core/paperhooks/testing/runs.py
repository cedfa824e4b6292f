"""Checks that train: a few steps stay finite, resume is bit-identical, N processes equal 1.

They train :func:`~paperhooks.testing.metadata.tiny_recipe` on CPU: in-process for one
process, through ``paperhooks fit`` in a subprocess for several (under pytest an in-process
``ddp`` run would re-launch pytest as rank 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from paperhooks.testing import assert_nested_equal, assert_states_close, fit_cli, load_checkpoint
from paperhooks.testing.families import ConformanceError, fail
from paperhooks.testing.metadata import check_entry_point, tiny_recipe


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [
        logging.getLogger(n)
        for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            # paperhooks' sampler resumes mid-epoch from the trainer's progress, which this
            # warning of Lightning's does not know
            warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _fit(raw: Mapping[str, Any], resume: Path | str | None = None) -> tuple[Any, dict[str, float]]:
    from paperhooks import recipe as R
    from paperhooks.run import fit

    with _quiet():
        return fit(R.validate(raw), resume=None if resume is None else str(resume))


def _plugin_entry(name: str, plugin_config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"name": name, **dict(plugin_config or {})}


def check_few_steps(
    name: str,
    plugin_config: Mapping[str, Any] | None,
    tmp_path: Path,
    *,
    task: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """One epoch of :func:`tiny_recipe` (11 steps, then one validation batch), in-process.

    ``task``: the plugin's own model/data sections (see :func:`tiny_recipe`).

    Every logged metric and every final weight is finite, and the checkpoint (plugin state
    included) loads with ``weights_only=True``. Returns the final metrics.
    """
    raw = tiny_recipe(
        [_plugin_entry(name, plugin_config)],
        run_dir=Path(tmp_path) / "runs",
        name="few-steps",
        trainer={"max_steps": -1, "max_epochs": 1, "limit_val_batches": 1},
        task=task,
    )
    built, metrics = _fit(raw)
    try:
        ckpt = load_checkpoint(built.run_dir)
    except Exception as e:  # noqa: BLE001 - e.g. plugin state that weights_only refuses
        raise ConformanceError(
            f"plugin {name!r}: the checkpoint does not load with weights_only=True: {e}"
        ) from e
    if ckpt["global_step"] < 1:
        fail(name, "trained no step")
    if not any(k.startswith("train/") for k in metrics):
        fail(name, f"no training loss was logged; metrics: {sorted(metrics)}")
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        fail(name, f"metrics are not finite after {ckpt['global_step']} steps: {bad}")
    weights = [
        k
        for k, v in ckpt["state_dict"].items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if weights:
        fail(name, f"weights are not finite after {ckpt['global_step']} steps: {weights}")
    return metrics


def check_resume(
    name: str,
    plugin_config: Mapping[str, Any] | None,
    tmp_path: Path,
    *,
    stop: int = 13,
    max_steps: int = 16,
    task: Mapping[str, Any] | None = None,
) -> None:
    """A run resumed from its ``step{stop}.ckpt`` ends bit-identical to the run that did not stop.

    Compared: weights, optimizer and scheduler states, plugin states and pruning sparsity.
    The default ``stop`` is 2 steps into the second epoch; dropout makes RNG state matter.
    """
    raw = tiny_recipe(
        [_plugin_entry(name, plugin_config)],
        run_dir=Path(tmp_path) / "runs",
        name="full",
        trainer={"max_steps": max_steps, "checkpoint_every_n_steps": stop, "limit_val_batches": 0},
        task=task,
    )
    full, _ = _fit(raw)
    end = load_checkpoint(full.run_dir)
    mid = load_checkpoint(full.run_dir, f"step{stop}.ckpt")
    if mid["global_step"] != stop or end["global_step"] != max_steps:
        fail(
            name,
            f"expected checkpoints at steps {stop} and {max_steps}, got {mid['global_step']} and {end['global_step']}",
        )
    if all(torch.equal(mid["state_dict"][k], end["state_dict"][k]) for k in end["state_dict"]):
        fail(name, f"the weights did not change between steps {stop} and {max_steps}")
    resumed, _ = _fit(
        {**raw, "name": "resumed"}, resume=full.run_dir / "checkpoints" / f"step{stop}.ckpt"
    )
    again = load_checkpoint(resumed.run_dir)
    try:
        assert again["global_step"] == max_steps, (
            f"resumed run ended at step {again['global_step']}"
        )
        assert_states_close(end["state_dict"], again["state_dict"], atol=0)
        assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
        assert_nested_equal(end["lr_schedulers"], again["lr_schedulers"], "lr_schedulers")
        assert_nested_equal(
            end["paperhooks"]["plugins"], again["paperhooks"]["plugins"], "plugin states"
        )
        assert_nested_equal(
            end["paperhooks"]["sparsity"], again["paperhooks"]["sparsity"], "sparsity"
        )
    except AssertionError as e:
        raise ConformanceError(
            f"plugin {name!r}: resuming from step {stop} does not end bit-identical: {e}"
        ) from e


def check_ddp_equals_single(
    name: str,
    plugin_config: Mapping[str, Any] | None,
    tmp_path: Path,
    strategy: str = "ddp",
    *,
    devices: int = 2,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    task: Mapping[str, Any] | None = None,
) -> None:
    """``devices`` processes under ``strategy`` end where 1 process ends on the global batch.

    The 1-process run trains in this process, the ``devices``-process run through
    ``paperhooks fit`` in subprocesses (6 steps, global batch 64, no dropout).
    Weights must agree within ``atol``/``rtol`` and plugin states likewise. Skipped (with
    pytest) when the plugin declares the strategy unsupported.
    """
    from omegaconf import OmegaConf

    support = check_entry_point(name).strategies.get(strategy, "untested")
    if support == "unsupported":
        import pytest

        pytest.skip(f"plugin {name!r} declares strategy {strategy!r} unsupported")
    tmp_path = Path(tmp_path)
    raw = tiny_recipe(
        [_plugin_entry(name, plugin_config)],
        run_dir=tmp_path / "runs",
        trainer={"limit_val_batches": 0},
        batch_size=64,
        dropout=0.0,
        task=task,
    )
    path = tmp_path / "ddp.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))
    from paperhooks import recipe as R
    from paperhooks.run import fit

    one = load_checkpoint(fit(R.load(path, ["name=one"]))[0].run_dir)
    many = load_checkpoint(
        fit_cli(
            path,
            [f"name={strategy}", f"trainer.devices={devices}", f"trainer.strategy={strategy}"],
            cwd=tmp_path,
        )
    )
    try:
        assert one["global_step"] == many["global_step"], (
            f"steps differ: {one['global_step']} and {many['global_step']}"
        )
        assert_states_close(one["state_dict"], many["state_dict"], atol=atol, rtol=rtol)
        assert_nested_close(
            one["paperhooks"]["plugins"],
            many["paperhooks"]["plugins"],
            "plugin states",
            atol=atol,
            rtol=rtol,
        )
    except AssertionError as e:
        raise ConformanceError(
            f"plugin {name!r}: {devices} processes under {strategy!r} differ from 1 process on the global batch: {e}"
        ) from e


def assert_nested_close(a: Any, b: Any, where: str = "", *, atol: float, rtol: float) -> None:
    """:func:`~paperhooks.testing.assert_nested_equal` with a tolerance on floats and float tensors."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys differ"
        for k in a:
            assert_nested_close(a[k], b[k], f"{where}.{k}", atol=atol, rtol=rtol)
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_close(x, y, f"{where}[{i}]", atol=atol, rtol=rtol)
    else:
        assert_nested_equal(a, b, where)


__all__ = ["assert_nested_close", "check_ddp_equals_single", "check_few_steps", "check_resume"]
