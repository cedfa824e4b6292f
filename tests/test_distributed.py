"""N processes compute what one process computes on the global batch.

Each run goes through the real command line (a subprocess), as users run it. The global
batch is ``data.batch_size``; each of 2 ranks holds half of it. After the same number of
steps, the weights of the 2-process run equal those of the 1-process run up to float
summation order (tolerance 1e-6; observed differences are ~1e-8).
"""

from __future__ import annotations

import pytest
import torch

from helpers import fit_here, write_recipe
from paperhooks.testing import assert_states_close, final_state, fit_cli, load_checkpoint

pytestmark = pytest.mark.slow

RECIPE = """
seed: 3
name: dist
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
trainer: {max_steps: 6, enable_progress_bar: false, limit_val_batches: 0}
plugins:
  - {name: loss-reweighting, burnin_steps: 2}
  - {name: loss-rank}
  - {name: class-weight, cls: 3, factor: 3.0}
"""


def test_two_processes_equal_one_process_on_global_batch(tmp_path, test_plugins):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE)
    one = final_state(fit_here(recipe, ["name=one"], tmp_path))
    plain = final_state(fit_here(recipe, ["name=plain", "plugins=[]"], tmp_path))
    # the plugins change training, so the equalities below are not vacuous
    assert max((one[k] - plain[k]).abs().max().item() for k in one) > 1e-4
    for strategy in ("ddp", "fsdp2"):
        run = fit_cli(
            recipe,
            [f"name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}"],
            cwd=tmp_path,
        )
        assert_states_close(one, final_state(run), atol=1e-6, rtol=1e-5)
        # the stateful plugin ran at every step, and rank 0's state is what was saved
        plugins = load_checkpoint(run)["paperhooks"]["plugins"]
        assert plugins[1] == {"name": "loss-rank", "state": {"calls": 6}}, strategy


SURGERY = """
seed: 3
name: surgery
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
trainer: {max_steps: 5, enable_progress_bar: false, limit_val_batches: 0}
plugins:
  - {name: logit-penalty}
  - {name: mgda-surgery}
"""


def test_gradient_surgery_on_two_processes_equals_one_process(tmp_path, test_plugins):
    """MGDA over two objectives (cross-entropy and a logit penalty): DDP with the column split
    (reduce-scatter + Gram all-reduce), DDP with the full all-reduce, and FSDP2 (K backward
    passes, FSDP2's own reduce-scatter, inner products summed over shards) all end where one
    process ends on the global batch."""
    recipe = write_recipe(tmp_path / "s.yaml", SURGERY)
    one = final_state(fit_here(recipe, ["name=one"], tmp_path))
    plain = final_state(
        fit_here(recipe, ["name=plain", "plugins=[{name: logit-penalty}]"], tmp_path)
    )
    assert max((one[k] - plain[k]).abs().max().item() for k in one) > 1e-4  # MGDA changed training
    runs = {
        "ddp-columns": ["trainer.strategy=ddp"],
        "ddp-full": [
            "trainer.strategy=ddp",
            "plugins=[{name: logit-penalty}, {name: mgda-surgery-full}]",
        ],
        "fsdp2": ["trainer.strategy=fsdp2"],
    }
    for name, overrides in runs.items():
        run = fit_cli(recipe, [f"name={name}", "trainer.devices=2", *overrides], cwd=tmp_path)
        assert_states_close(one, final_state(run), atol=1e-6, rtol=1e-5)


def test_a_plugins_own_module_is_replicated_under_fsdp2_and_ends_where_one_process_ends(
    tmp_path, test_plugins
):
    """A plugin that trains a module beside the model (``critic``): FSDP2 shards the model, and
    the core keeps the critic whole on every rank, averaging its gradients before each step.
    Both with the plain step (automatic optimization) and with surgery (the critic's gradient
    is then part of the direction's unsharded rest); and with the critic called on the first
    half of the global batch only, so that rank 1 has no critic gradient at all (its ranks
    still reduce the same buffer, as DDP does with unused parameters)."""
    import torch

    recipe = write_recipe(tmp_path / "c.yaml", SURGERY)
    cases = {
        "plain": "plugins=[{name: critic}]",
        "surgery": "plugins=[{name: logit-penalty}, {name: critic}, {name: mgda-surgery}]",
        "rank-0-only": "plugins=[{name: critic, first_rows: 32}]",
    }
    ones = {}
    for case, plugins in cases.items():
        one = ones[case] = final_state(fit_here(recipe, [f"name={case}-one", plugins], tmp_path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3 + 1)  # the critic's initialization (seed + 1)
            init = torch.nn.Linear(10, 1).weight
        assert (one["critic.weight"] - init).abs().max() > 1e-4, case  # the critic trained
        run = fit_cli(
            recipe,
            [f"name={case}-fsdp2", "trainer.devices=2", "trainer.strategy=fsdp2", plugins],
            cwd=tmp_path,
        )
        assert_states_close(one, final_state(run), atol=1e-6, rtol=1e-5)
    # DDP needs trainer.find_unused_parameters when rank 1 never calls the critic
    run = fit_cli(
        recipe,
        ["name=rank-0-only-ddp", "trainer.devices=2", "trainer.strategy=ddp",
         "trainer.find_unused_parameters=true", cases["rank-0-only"]],
        cwd=tmp_path,
    )  # fmt: skip
    assert_states_close(ones["rank-0-only"], final_state(run), atol=1e-6, rtol=1e-5)


def test_ddp_without_find_unused_parameters_names_the_recipe_key_instead_of_hanging(
    tmp_path, test_plugins
):
    """The same rank-0-only critic under DDP without ``trainer.find_unused_parameters``: DDP
    would hang (rank 0 waits in the all-reduce of the critic's bucket, which rank 1 never
    starts; measured: killed after 150 s). Rank 1 now stops with an error naming the
    parameters, the plugin that added them and the recipe key, and the run ends."""
    from paperhooks.testing import paperhooks_cli

    recipe = write_recipe(tmp_path / "c.yaml", SURGERY)
    proc = paperhooks_cli(
        "fit", str(recipe), "name=unused", "trainer.devices=2", "trainer.strategy=ddp",
        "plugins=[{name: critic, first_rows: 32}]", cwd=tmp_path, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert (
        "paperhooks: error: under strategy 'ddp', parameter(s) critic.weight, critic.bias "
        "(added by plugin 'critic') got no gradient on rank 1 at step 0"
    ) in proc.stderr, proc.stderr[-3000:]
    assert "trainer.find_unused_parameters: true" in proc.stderr


def test_preference_objective_with_pair_weights_on_two_processes_equals_one(tmp_path):
    """DPO with a frozen reference model (replicated under DDP, sharded under FSDP2) and
    per-pair loss-based weights, from ``recipes/compose-dpo-reweighting.yaml``."""
    from helpers import ROOT

    recipe = ROOT / "recipes" / "compose-dpo-reweighting.yaml"
    # SGD, not the recipe's Adam: GPT-2's key biases get exactly zero gradient in exact
    # arithmetic (softmax ignores a shift), so their float gradients are summation-order noise
    # (~1e-10) that Adam would normalize into lr-sized steps, differently on 1 and 2 processes.
    common = [
        f"run_dir={tmp_path}/runs", "trainer.max_epochs=null", "trainer.max_steps=6", "trainer.limit_val_batches=0",
        "optimizer.name=sgd", "optimizer.lr=0.5", "optimizer.momentum=0.9",
    ]  # fmt: skip
    one = final_state(fit_here(recipe, [*common, "name=one"], tmp_path))
    plain = final_state(fit_here(recipe, [*common, "name=plain", "plugins=[]"], tmp_path))
    assert max((one[k] - plain[k]).abs().max().item() for k in one) > 1e-5  # the weights mattered
    assert any(k.startswith("reference_model.") for k in one)
    for strategy in ("ddp", "fsdp2"):
        run = fit_cli(
            recipe,
            [*common, f"name={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}"],
            cwd=tmp_path,
        )
        assert_states_close(one, final_state(run), atol=1e-6, rtol=1e-5)
    pre = [*common, "objective.reference=precomputed"]
    one_pre = final_state(fit_here(recipe, [*pre, "name=one-pre"], tmp_path))
    ddp_pre = fit_cli(
        recipe, [*pre, "name=ddp-pre", "trainer.devices=2", "trainer.strategy=ddp"], cwd=tmp_path
    )
    assert_states_close(one_pre, final_state(ddp_pre), atol=1e-6, rtol=1e-5)


def test_a_crash_on_one_rank_ends_the_run_instead_of_hanging(tmp_path, test_plugins):
    """An exception on one rank only leaves the other ranks inside a collective; the run must
    still end, with the error, and keep what can be kept. DDP: rank 0 writes
    ``on_exception.ckpt`` once rank 1 has exited (every rank holds the whole state). FSDP2:
    saving gathers shards, so with a crash on one rank no file is written (said on stderr);
    with a crash on every rank the file is written, at the step reached."""
    from pathlib import Path

    from paperhooks.testing import paperhooks_cli

    recipe = write_recipe(tmp_path / "r.yaml", RECIPE)

    def crash(name: str, strategy: str, rank: int):
        plugins = f"plugins=[{{name: loss-rank, crash_at: 3, crash_rank: {rank}}}]"
        proc = paperhooks_cli(
            "fit", str(recipe), f"name={name}", "trainer.devices=2",
            f"trainer.strategy={strategy}", plugins, cwd=tmp_path, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode != 0, name
        assert "crash at step 3" in proc.stdout + proc.stderr, name
        (run,) = sorted(Path(tmp_path, "runs", name).glob("version_*"))
        return proc, run / "checkpoints" / "on_exception.ckpt"

    _, saved = crash("ddp-rank1", "ddp", 1)
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] == 3
    proc, saved = crash("fsdp2-rank1", "fsdp2", 1)
    assert not saved.exists() and "on_exception.ckpt not written" in proc.stderr
    _, saved = crash("fsdp2-all", "fsdp2", -1)
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] == 3


def test_the_exception_checks_gloo_group_is_freed_at_teardown(tmp_path):
    """Each fit under a sharded strategy makes a gloo group for ``on_exception``; teardown
    destroys it, so repeated fits in one process (a script, a sweep) do not pile groups up.
    In a subprocess: a 1-process gloo world, three setup/teardown cycles of the callback."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import types
        from pathlib import Path

        import torch.distributed as td
        from torch.distributed.distributed_c10d import _world

        from paperhooks.run import _checkpoint_callback_cls

        td.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        before = len(_world.pg_map)
        cb = _checkpoint_callback_cls()(Path("{tmp_path}"), None)
        trainer = types.SimpleNamespace(world_size=2)
        ctx = types.SimpleNamespace(strategy="fsdp2")
        module = types.SimpleNamespace(hooks=types.SimpleNamespace(ctx=ctx))
        for _ in range(3):
            cb.setup(trainer, module, "fit")
            assert cb._group is not None and len(_world.pg_map) == before + 1
            cb.teardown(trainer, module, "fit")
        assert cb._group is None and len(_world.pg_map) == before, len(_world.pg_map)
        td.destroy_process_group()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
