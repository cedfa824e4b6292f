"""The pruning family's core: built-in schedules and allocation, masks equal to
``torch.nn.utils.prune``, exact distributed top-k, zeros after every step and after resume,
2 processes = 1 process, and the export's size report (issue 6, core part)."""

from __future__ import annotations

import copy
import csv
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune

from helpers import fit_here, write_recipe
from paperhooks import cli, dist, pruning
from paperhooks import recipe as R
from paperhooks.builtins.pruning import (
    GradualConfig,
    IterativeConfig,
    cubic_sparsity,
    iterative_sparsity,
)
from paperhooks.context import StepContext
from paperhooks.errors import ConfigTypeError
from paperhooks.run import fit
from paperhooks.share import read_size
from paperhooks.testing import (
    assert_nested_equal,
    assert_states_close,
    final_state,
    fit_cli,
    load_checkpoint,
)
from paperhooks.testing.conformance import tiny_recipe


# -- the cubic schedule ------------------------------------------------------------------------------
def test_cubic_schedule_at_hand_computed_steps():
    # s_i = 0.1, s_f = 0.7, t_0 = 10, nΔt = 30, Δt = 10: pruning steps 10, 20, 30, 40
    c = GradualConfig(
        initial_sparsity=0.1, final_sparsity=0.7, begin_step=10, end_step=40, frequency=10
    )
    # s_t = 0.7 + (0.1 - 0.7)(1 - (t - 10)/30)^3
    assert cubic_sparsity(10, c) == pytest.approx(0.1)  # (1 - 0)^3 = 1
    assert cubic_sparsity(20, c) == pytest.approx(0.7 - 0.6 * 8 / 27)  # (2/3)^3 = 8/27 -> 0.52222
    assert cubic_sparsity(30, c) == pytest.approx(0.7 - 0.6 / 27)  # (1/3)^3 = 1/27 -> 0.67778
    assert cubic_sparsity(40, c) == 0.7  # exactly s_f at t_0 + nΔt
    for t in (0, 9, 15, 39, 41, 50):  # before, between and after the pruning steps: no update
        assert cubic_sparsity(t, c) is None


def test_cubic_schedule_defaults_are_the_official_codes():
    c = GradualConfig()  # tensorflow/contrib/model_pruning get_pruning_hparams()
    assert (
        c.initial_sparsity,
        c.final_sparsity,
        c.begin_step,
        c.end_step,
        c.frequency,
        c.exponent,
    ) == (0.0, 0.5, 0, 100, 10, 3.0)
    assert cubic_sparsity(50, c) == pytest.approx(0.5 - 0.5 * 0.5**3)  # 0.4375, half-way


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "gradual-pruning", "final_sparsity": 1.0},
            r"gradual-pruning: final_sparsity must be a number in \[0, 1\), got 1.0",
        ),
        (
            {"name": "gradual-pruning", "initial_sparsity": -0.1},
            r"gradual-pruning: initial_sparsity must be a number in \[0, 1\)",
        ),
        (
            {"name": "gradual-pruning", "initial_sparsity": 0.6, "final_sparsity": 0.5},
            r"initial_sparsity \(0.6\) must be <= final_sparsity",
        ),
        (
            {"name": "gradual-pruning", "end_step": 95},
            r"end_step - begin_step \(95 - 0\) must be a multiple of frequency \(10\)",
        ),
        (
            {"name": "gradual-pruning", "frequency": 0},
            r"gradual-pruning: frequency must be an integer >= 1, got 0",
        ),
        (
            {"name": "one-shot-pruning", "sparsity": 1.5},
            r"one-shot-pruning: sparsity must be a number in \[0, 1\), got 1.5",
        ),
        (
            {"name": "one-shot-pruning", "step": -1},
            r"one-shot-pruning: step must be an integer >= 0, got -1",
        ),
    ],
)
def test_bad_config_names_the_plugin_and_the_key(entry, message):
    with pytest.raises(ConfigTypeError, match=message):
        R.validate(tiny_recipe([entry]))


# -- epoch units and the iterative schedule -----------------------------------------------------------------
def _plugin(entry):
    """The plugin instance a recipe entry builds (config validated as in a recipe)."""
    spec = R.validate(tiny_recipe([entry])).plugins[0]
    return spec.cls(spec.config)


def _asked(plugin, steps, steps_per_epoch=None):
    """{step: sparsity} the plugin's schedule asks at steps 0..steps - 1 (None left out)."""
    out = {}
    for t in range(steps):
        got = plugin.pruning_schedule(ctx=StepContext(step=t, steps_per_epoch=steps_per_epoch))
        if got is not None:
            out[t] = got
    return out


def test_schedules_in_epochs_are_the_step_schedules_times_the_steps_per_epoch():
    # S = 7 optimizer steps an epoch: epoch e is step 7e
    one = _plugin({"name": "one-shot-pruning", "sparsity": 0.6, "step": 2, "unit": "epoch"})
    assert _asked(one, 40, 7) == {14: 0.6}
    # gradual, epochs t_0 = 1, t_0 + nΔt = 4, Δt = 1: steps 7, 14, 21, 28, i.e. 0.8 - 0.8(1 - k/3)^3
    by_epoch = _plugin(
        {
            "name": "gradual-pruning",
            "final_sparsity": 0.8,
            "begin_step": 1,
            "end_step": 4,
            "frequency": 1,
            "unit": "epoch",
        }
    )
    by_step = _plugin(
        {
            "name": "gradual-pruning",
            "final_sparsity": 0.8,
            "begin_step": 7,
            "end_step": 28,
            "frequency": 7,
        }
    )
    asked = _asked(by_epoch, 40, 7)
    assert asked == _asked(by_step, 40)
    assert asked == pytest.approx(
        {7: 0.0, 14: 0.8 - 0.8 * (2 / 3) ** 3, 21: 0.8 - 0.8 / 27, 28: 0.8}
    )
    # the step unit ignores S
    assert _asked(by_step, 40, 5) == _asked(by_step, 40)
    assert cubic_sparsity(21, by_epoch.config, steps_per_epoch=7) == cubic_sparsity(
        21, by_step.config
    )


def test_iterative_schedule_prunes_the_same_fraction_of_the_remaining_weights_each_cycle():
    # s_f = 0.875 in n = 3 cycles: r = 1 - 0.125^(1/3) = 0.5, s_k = 1 - 0.5^k = 0.5, 0.75, 0.875
    c = IterativeConfig(final_sparsity=0.875, cycles=3, begin=10, every=5)
    assert c.rate == pytest.approx(0.5)
    asked = {t: iterative_sparsity(t, c) for t in range(40) if iterative_sparsity(t, c) is not None}
    assert asked == pytest.approx({10: 0.5, 15: 0.75, 20: 0.875})
    assert asked[20] == 0.875  # the last cycle gives s_f exactly
    # each cycle removes r of what is left: s_k - s_{k-1} = r (1 - s_{k-1})
    assert asked[15] - asked[10] == pytest.approx(0.5 * (1 - asked[10]))
    # in epochs of S = 7 steps: begin 10 epochs = step 70, then every 35 steps
    epochs = _plugin(
        {
            "name": "iterative-pruning",
            "final_sparsity": 0.875,
            "cycles": 3,
            "begin": 10,
            "every": 5,
            "unit": "epoch",
        }
    )
    assert _asked(epochs, 200, 7) == pytest.approx({70: 0.5, 105: 0.75, 140: 0.875})
    # s_f = 0.9 in 2 cycles: r = 1 - sqrt(0.1) = 0.68377, s_1 = r; begin 0 prunes before the first update
    two = IterativeConfig(final_sparsity=0.9, cycles=2, begin=0, every=3)
    assert [iterative_sparsity(t, two) for t in range(7)] == pytest.approx(
        [1 - 0.1**0.5, None, None, 0.9, None, None, None]
    )
    one = IterativeConfig(
        final_sparsity=0.9, cycles=1, begin=4, every=3
    )  # one cycle: one-shot at begin
    assert {
        t: iterative_sparsity(t, one) for t in range(20) if iterative_sparsity(t, one) is not None
    } == {4: 0.9}


@pytest.mark.parametrize(
    ("entry", "keys"),
    [
        ({"name": "one-shot-pruning", "step": 1, "unit": "epoch"}, "step"),
        (
            {"name": "gradual-pruning", "unit": "epoch", "end_step": 10, "frequency": 1},
            "begin_step, end_step, frequency",
        ),
        ({"name": "iterative-pruning", "unit": "epoch"}, "begin, every"),
    ],
)
def test_an_epoch_schedule_without_a_known_epoch_length_names_the_plugin_and_keys(entry, keys):
    plugin = _plugin(entry)
    name = entry["name"]
    with pytest.raises(
        ValueError,
        match=rf"{name}: unit: epoch counts {keys} in epochs, but the number of optimizer steps per epoch is unknown",
    ):
        plugin.pruning_schedule(
            ctx=StepContext(step=0, steps_per_epoch=None)
        )  # an iterable dataset of unknown length
    with pytest.raises(
        ValueError,
        match=rf"{name}: unit: epoch counts {keys} in epochs, but an epoch has 0 optimizer steps",
    ):
        plugin.pruning_schedule(ctx=StepContext(step=0, steps_per_epoch=0))
    step_unit = _plugin({**entry, "unit": "step"})  # counting in steps needs no epoch length
    step_unit.pruning_schedule(ctx=StepContext(step=0, steps_per_epoch=None))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "iterative-pruning", "unit": "epochs"},
            r"\(iterative-pruning\)\.unit must be one of 'step' \| 'epoch', got 'epochs'",
        ),
        (
            {"name": "gradual-pruning", "unit": "batch"},
            r"\(gradual-pruning\)\.unit must be one of 'step' \| 'epoch', got 'batch'",
        ),
        (
            {"name": "iterative-pruning", "cycles": 0},
            r"iterative-pruning: cycles must be an integer >= 1, got 0",
        ),
        (
            {"name": "iterative-pruning", "every": 0},
            r"iterative-pruning: every must be an integer >= 1, got 0",
        ),
        (
            {"name": "iterative-pruning", "begin": -1},
            r"iterative-pruning: begin must be an integer >= 0, got -1",
        ),
        (
            {"name": "iterative-pruning", "final_sparsity": 1.0},
            r"iterative-pruning: final_sparsity must be a number in \[0, 1\), got 1.0",
        ),
    ],
)
def test_bad_unit_or_iterative_config_names_the_plugin_and_the_key(entry, message):
    with pytest.raises(ConfigTypeError, match=message):
        R.validate(tiny_recipe([entry]))


def test_pruning_under_lightning_fsdp_is_refused_before_training_with_the_reason():
    raw = tiny_recipe(
        [{"name": "gradual-pruning"}],
        trainer={"strategy": "fsdp", "devices": 2, "accelerator": "gpu"},
    )
    with pytest.raises(
        Exception, match=r"'gradual-pruning' \(pruning\) cannot run under strategy 'fsdp'"
    ):
        R.check_strategy(R.validate(raw))


@pytest.mark.parametrize(
    "name", ["one-shot-pruning", "gradual-pruning", "iterative-pruning", "uniform-allocation"]
)
def test_built_ins_pass_the_pruning_family_checks(name):
    from paperhooks.testing import conformance as C

    C.check_metadata(C.check_entry_point(name), name)
    # iterative-pruning's default first prune (step 100) is past the check's 20 steps
    C.check_family(name, {"begin": 4, "every": 6} if name == "iterative-pruning" else None)


# -- masks equal torch.nn.utils.prune -------------------------------------------------------------------
def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77, 0.9])
def test_global_magnitude_masks_equal_torch_global_unstructured(sparsity):
    model = _mlp(0)  # random normal-ish weights: no two magnitudes tie
    reference = copy.deepcopy(model)
    layers = [m for m in reference if isinstance(m, nn.Linear)]
    prune.global_unstructured(
        [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=sparsity
    )
    params = {k: m.weight for k, m in pruning.prunable(model).items()}
    keep = pruning.global_allocation(pruning.magnitude_scores(params), sparsity)
    for (k, mask), layer in zip(keep.items(), layers, strict=True):
        assert torch.equal(mask, layer.weight_mask.bool()), k
    total = sum(p.numel() for p in params.values())  # 117 + 63 + 21 = 201
    assert sum(int((~m).sum()) for m in keep.values()) == round(sparsity * total)


def test_half_counts_round_as_torch_does():
    # 201 weights at 0.5: 100.5 rounds to 100 pruned (Python's round, as torch's prune)
    model = _mlp(1)
    reference = copy.deepcopy(model)
    prune.global_unstructured(
        [(m, "weight") for m in reference if isinstance(m, nn.Linear)],
        pruning_method=prune.L1Unstructured,
        amount=0.5,
    )
    keep = pruning.global_allocation(
        pruning.magnitude_scores({k: m.weight for k, m in pruning.prunable(model).items()}), 0.5
    )
    assert sum(int((~m).sum()) for m in keep.values()) == 100
    assert (
        sum(int((m.weight_mask == 0).sum()) for m in reference if isinstance(m, nn.Linear)) == 100
    )


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_uniform_allocation_equals_torch_l1_unstructured_per_layer(sparsity):
    model = _mlp(2)
    reference = copy.deepcopy(model)
    scores = pruning.magnitude_scores({k: m.weight for k, m in pruning.prunable(model).items()})
    keep = pruning.uniform_allocation(scores, sparsity)
    for k, m in pruning.prunable(reference).items():
        prune.l1_unstructured(m, "weight", amount=sparsity)
        assert torch.equal(keep[k], m.weight_mask.bool()), k
        assert int((~keep[k]).sum()) == round(sparsity * m.weight.numel())


def test_ties_keep_the_earlier_entry():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([2.0, 0.0])}
    # prune round(0.6·5) = 3, keep 2 of the three 2.0s: the two earlier ones (a[1], a[2])
    keep = pruning.global_allocation(scores, 0.6)
    assert keep["a"].tolist() == [False, True, True] and keep["b"].tolist() == [False, False]
    keep = pruning.uniform_allocation(scores, 0.5)  # a: round(1.5) = 2 pruned, b: round(1.0) = 1
    assert keep["a"].tolist() == [False, True, False] and keep["b"].tolist() == [True, False]


def test_selection_equals_the_stable_sort_for_every_count_with_ties_signed_zeros_and_nan():
    # _stable_top selects with kthvalue on CPU (sorting only NaN scores); every count of
    # every case must give the stable descending sort's first entries
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(37, generator=g),
        torch.randint(0, 4, (41,), generator=g).float(),  # many ties
        torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 1.0, 2.0]),  # -0.0 == 0.0: a tie, kept in order
        torch.randint(0, 5, (23,), generator=g),  # integer scores
        torch.tensor(
            [1.0, float("nan"), 0.5, float("nan"), 2.0]
        ),  # NaN ranks first, as in the sort
    ]
    for flat in cases:
        for keep in range(flat.numel() + 1):
            assert torch.equal(pruning._stable_top(flat, keep), _reference_topk(flat, keep)), (
                flat,
                keep,
            )


def test_the_mask_product_is_the_boolean_product_bit_for_bit_and_follows_every_mask_change():
    # On CPU the Mask multiplies by a cached 0/1 copy of M in the weight's dtype; the values,
    # signs of zero included, must be those of w * M, and the copy must follow M's changes
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, generator=g)
    w[0, :3] = torch.tensor([-1.0, 0.0, -0.0])
    mask = pruning.Mask(w.shape)

    def same(w: torch.Tensor) -> None:
        got, want = mask(w), w * mask.mask
        assert (
            got.dtype == want.dtype
            and torch.equal(got, want)
            and torch.equal(got.signbit(), want.signbit())
        )

    same(w)
    mask.mask &= torch.rand(5, 6, generator=g) > 0.5  # in place
    mask.mask[0, 0] = False  # -1.0 · 0 = -0.0
    same(w)
    mask.mask.copy_(torch.rand(5, 6, generator=g) > 0.3)
    same(w)
    mask.load_state_dict({"mask": torch.rand(5, 6, generator=g) > 0.7})
    same(w)
    mask.double()  # a new buffer, and a new dtype
    same(w.double())
    v = w.clone().requires_grad_()
    mask(v).sum().backward()  # ∂(w ⊙ M)/∂w = M
    assert torch.equal(v.grad, mask.mask.float())
    layer = nn.Linear(6, 5)
    masks = pruning.add_masks(nn.Sequential(layer))
    masks["0"].mask.copy_(mask.mask)
    pruning.zero_pruned(nn.Sequential(layer), masks)  # stored weight zero exactly where M is False
    stored = pruning.stored(layer).detach()
    assert bool((stored[~mask.mask] == 0).all()) and bool((stored[mask.mask] != 0).all())


# -- exact top-k without gathering the scores -------------------------------------------------------------
def _reference_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """One process, the global order: stable descending sort, first k kept."""
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return keep


def test_order_keys_are_monotone_and_equal_for_signed_zeros():
    x = torch.tensor([float("-inf"), -3.0, -1e-40, -0.0, 0.0, 1e-40, 2.5, float("inf")])
    keys, bits = dist.order_keys(x)
    assert bits == 32 and keys[3] == keys[4] == 0
    assert bool((keys[1:] >= keys[:-1]).all()) and len(set(keys.tolist())) == 7
    keys64, bits64 = dist.order_keys(x.double())
    assert bits64 == 64 and torch.equal(
        torch.argsort(keys64, stable=True), torch.argsort(keys, stable=True)
    )
    with pytest.raises(ValueError, match="NaN"):
        dist.order_keys(torch.tensor([1.0, float("nan")]))


def test_topk_takes_k_as_a_function_of_the_global_count():
    parts = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 4.0])]
    masks = dist.topk_mask(parts, lambda n: n - pruning.pruned_count(n, 0.6))  # 5 - 3 = 2 kept
    assert masks[0].tolist() == [True, False, False] and masks[1].tolist() == [False, True]


def test_topk_on_one_process_equals_the_stable_sort():
    g = torch.Generator().manual_seed(0)
    parts = [
        torch.randint(0, 5, (6, 4), generator=g).float(),
        torch.randint(0, 5, (11,), generator=g).float(),
    ]
    flat = torch.cat([p.reshape(-1) for p in parts])
    for k in range(flat.numel() + 1):
        got = torch.cat([m.reshape(-1) for m in dist.topk_mask(parts, k)])
        assert torch.equal(got, _reference_topk(flat, k)), k
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 35\]"):
        dist.topk_mask(parts, 36)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_topk_on_two_processes_equals_one_process_and_sends_only_counts(tmp_path):
    from _topk_worker import KS, run, shards

    mp.start_processes(
        run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for case, ks in KS.items():
        parts = [shards(r)[case] for r in range(2)]
        sizes = [sum(t.numel() for t in p) for p in parts]
        # tensor by tensor, rank 0's part of each first: the row-major order of whole tensors
        flat = torch.cat(
            [parts[r][j].reshape(-1).double() for j in range(len(parts[0])) for r in range(2)]
        )
        for k in ks:
            pieces = [got[r][f"{case}/{k}"].split([t.numel() for t in parts[r]]) for r in range(2)]
            both = torch.cat([pieces[r][j] for j in range(len(parts[0])) for r in range(2)])
            assert torch.equal(both, _reference_topk(flat, k)), (case, k)
            assert int(both.sum()) == k
            assert got[0][f"{case}/{k}"].numel() == sizes[0]
            if 0 < k < sum(sizes):
                # counts only: 1 + 32 (64 for float64) all-reduces of int64, one all-gather of
                # (above, ties per tensor) (+ its row count); no score crosses ranks
                rounds = 64 if case == "wide" else 32
                assert int(got[0][f"{case}/{k}/all_reduce"]) == 16 + 8 * rounds
                assert int(got[0][f"{case}/{k}/all_gather"]) == 8 + 8 * (1 + len(parts[0]))
    for r in got:
        assert r["stats/n"].tolist() == [3, 10] and r["stats/n"].dtype == torch.int64
        assert torch.equal(r["stats/x"], torch.full((2, 2), 1.5))


# -- training: zeros after every step, logging, resume ---------------------------------------------------------
GRADUAL = """
seed: 4
name: gradual
model: {name: mlp, hidden: [32], dropout: 0.2}
data: {name: digits, batch_size: 128}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.001, scheduler: cosine}
trainer: {max_steps: 20, enable_progress_bar: false, limit_val_batches: 0, log_every_n_steps: 1}
plugins:
  - {name: gradual-pruning, initial_sparsity: 0.0, final_sparsity: 0.8, begin_step: 2, end_step: 14, frequency: 4}
  - {name: uniform-allocation}
  - {name: mask-probe}
"""


def _metrics(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_gradual_schedule_trains_with_zeros_after_every_step_and_logs_each_layer(
    tmp_path, test_plugins, monkeypatch
):
    # every 4th step is a logging step: sparsity is logged on those and on mask changes only
    logged = []
    real_log = StepContext.log

    def spy(self, name, value):
        if name == "pruning/sparsity":
            logged.append(self.step)
        real_log(self, name, value)

    monkeypatch.setattr(StepContext, "log", spy)
    path = write_recipe(
        tmp_path / "g.yaml",
        GRADUAL.replace("log_every_n_steps: 1", "log_every_n_steps: 4")
        + f"run_dir: {tmp_path}/runs\n",
    )
    built, _ = fit(R.load(path))
    ckpt = load_checkpoint(built.run_dir)
    assert ckpt["paperhooks"]["plugins"][2]["state"] == {
        "checked": 20
    }  # the probe ran after all 20 steps
    state = ckpt["state_dict"]
    # layers 64x32 and 32x10: round(0.8·2048) = 1638 and round(0.8·320) = 256 pruned
    for key, n, pruned in (("model.1", 2048, 1638), ("model.4", 320, 256)):
        mask = state[f"{key}.parametrizations.weight.0.mask"]
        assert mask.numel() == n and int((~mask).sum()) == pruned
        assert bool((state[f"{key}.parametrizations.weight.original"][~mask] == 0).all())
    assert ckpt["paperhooks"]["sparsity"] == pytest.approx((1638 + 256) / 2368)
    # ctx.step counts completed steps: the first step (nothing counted yet), the steps whose masks
    # changed (6, 10, 14; at 2 the target 0 is the current sparsity) and the logging steps 4k
    assert logged == [1, 4, 6, 8, 10, 12, 14, 16, 20]
    rows = _metrics(built.run_dir)
    by_step = {int(r["step"]): r for r in rows if r.get("pruning/sparsity/1")}
    assert sorted(by_step) == [3, 7, 11, 15, 19]  # Lightning's step index: after step t it is t - 1
    # schedule: s_t = 0.8 - 0.8(1 - (t - 2)/12)^3 at t = 2, 6, 10, 14, held in between
    expected = {3: 0.0, 7: 0.8 - 0.8 * (2 / 3) ** 3, 11: 0.8 - 0.8 * (1 / 3) ** 3, 15: 0.8, 19: 0.8}
    for step, s in expected.items():
        assert float(by_step[step]["pruning/sparsity/1"]) == pytest.approx(
            round(s * 2048) / 2048
        ), step
        assert float(by_step[step]["pruning/sparsity/4"]) == pytest.approx(round(s * 320) / 320), (
            step
        )
        assert float(by_step[step]["pruning/sparsity"]) == pytest.approx(
            (round(s * 2048) + round(s * 320)) / 2368
        ), step


def test_one_shot_at_step_zero_prunes_before_the_first_update(tmp_path, test_plugins):
    raw = tiny_recipe(
        [{"name": "one-shot-pruning", "sparsity": 0.75, "step": 0}, {"name": "mask-probe"}],
        run_dir=tmp_path / "runs",
        trainer={"max_steps": 3, "limit_val_batches": 0},
    )
    built, _ = fit(R.validate(raw))
    ckpt = load_checkpoint(built.run_dir)
    # mlp 64-16-4... the kit's: 64x16 and 16x10 -> 1184 weights, round(0.75·1184) = 888 pruned
    masks = [v for k, v in ckpt["state_dict"].items() if k.endswith(".mask")]
    assert sum(int((~m).sum()) for m in masks) == 888
    assert ckpt["paperhooks"]["plugins"][1]["state"] == {"checked": 3}


def test_resume_in_the_middle_of_the_gradual_schedule_is_bit_identical(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "g.yaml", GRADUAL + f"run_dir: {tmp_path}/runs\n")
    full, _ = fit(R.load(path, ["name=full", "trainer.checkpoint_every_n_steps=4"]))
    end = load_checkpoint(full.run_dir)
    for stop in (
        8,
        12,
    ):  # between pruning steps (2, 6, 10, 14); step 12 is in the second epoch (11 batches each)
        mid = load_checkpoint(full.run_dir, f"step{stop}.ckpt")
        assert 0 < mid["paperhooks"]["sparsity"] < end["paperhooks"]["sparsity"]  # mid-schedule
        resumed, _ = fit(
            R.load(path, [f"name=resumed{stop}"]),
            resume=str(full.run_dir / "checkpoints" / f"step{stop}.ckpt"),
        )
        again = load_checkpoint(resumed.run_dir)
        assert_states_close(end["state_dict"], again["state_dict"], atol=0)
        assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
        assert_nested_equal(
            end["paperhooks"],
            {**again["paperhooks"], "recipe": end["paperhooks"]["recipe"]},
            "paperhooks",
        )


# -- epochs and iterative pruning in a fit -----------------------------------------------------------------------
# 1437 training digits in global batches of 200 (the last 37 dropped): S = 7 optimizer steps an epoch
EPOCHS = """
seed: 4
name: epochs
model: {name: mlp, hidden: [32], dropout: 0.2}
data: {name: digits, batch_size: 200}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.001, scheduler: cosine}
trainer: {max_steps: 24, enable_progress_bar: false, limit_val_batches: 0, log_every_n_steps: 1}
"""


def _layer_sparsity(run_dir):
    """{logged step index: (sparsity of layer 1, of layer 4)}; the value after step t is at index t - 1."""
    return {
        int(r["step"]): (float(r["pruning/sparsity/1"]), float(r["pruning/sparsity/4"]))
        for r in _metrics(run_dir)
        if r.get("pruning/sparsity/1")
    }


def test_an_epoch_schedule_prunes_at_epoch_ends_and_equals_the_step_schedule(
    tmp_path, test_plugins
):
    path = write_recipe(tmp_path / "e.yaml", EPOCHS + f"run_dir: {tmp_path}/runs\n")
    gradual = "{name: gradual-pruning, initial_sparsity: 0.2, final_sparsity: 0.8, %s}"
    runs = {}
    for unit, keys in (
        ("epoch", "begin_step: 1, end_step: 3, frequency: 1, unit: epoch"),
        ("step", "begin_step: 7, end_step: 21, frequency: 7"),
    ):
        plugins = f"plugins=[{gradual % keys}, {{name: uniform-allocation}}, {{name: mask-probe}}]"
        runs[unit], _ = fit(R.load(path, [f"name={unit}", plugins]))
    logged = _layer_sparsity(runs["epoch"].run_dir)
    # s_t = 0.8 - 0.6(1 - (t - 7)/14)^3 at t = 7, 14, 21 (epochs 1, 2, 3 of 7 steps): 0.2, 0.725, 0.8
    for t, s in {
        6: 0.0,
        7: 0.2,
        13: 0.2,
        14: 0.8 - 0.6 / 8,
        20: 0.8 - 0.6 / 8,
        21: 0.8,
        24: 0.8,
    }.items():
        assert logged[t - 1] == pytest.approx((round(s * 2048) / 2048, round(s * 320) / 320)), t
    assert logged == _layer_sparsity(runs["step"].run_dir)
    epoch, step = load_checkpoint(runs["epoch"].run_dir), load_checkpoint(runs["step"].run_dir)
    assert_states_close(
        epoch["state_dict"], step["state_dict"], atol=0
    )  # masks and weights bit-identical
    assert epoch["paperhooks"]["plugins"][2]["state"] == {"checked": 24}


def test_an_epoch_counts_the_optimizer_steps_after_gradient_accumulation(tmp_path, test_plugins):
    # 7 batches an epoch, 2 per step: steps after batches 2, 4, 6 and 7 (the last, partial one), S = 4
    path = write_recipe(tmp_path / "e.yaml", EPOCHS + f"run_dir: {tmp_path}/runs\n")
    plugins = "plugins=[{name: one-shot-pruning, sparsity: 0.5, step: 1, unit: epoch}, {name: uniform-allocation}]"
    built, _ = fit(
        R.load(path, [plugins, "trainer.accumulate_grad_batches=2", "trainer.max_steps=6"])
    )
    assert built.module.hooks.ctx.steps_per_epoch == 4
    logged = _layer_sparsity(built.run_dir)
    assert (
        logged[2] == (0.0, 0.0) and logged[3] == (0.5, 0.5) and logged[5] == (0.5, 0.5)
    )  # pruned after step 4


ITERATIVE = (
    EPOCHS.replace("max_steps: 24", "max_steps: 26")
    + """
plugins:
  - {name: iterative-pruning, final_sparsity: 0.875, cycles: 3, begin: 1, every: 1, unit: epoch}
  - {name: uniform-allocation}
  - {name: mask-probe}
"""
)


def test_iterative_pruning_reaches_each_cycle_exactly_and_resumes_bit_identical(
    tmp_path, test_plugins
):
    path = write_recipe(tmp_path / "i.yaml", ITERATIVE + f"run_dir: {tmp_path}/runs\n")
    full, _ = fit(R.load(path, ["name=full", "trainer.checkpoint_every_n_steps=5"]))
    end = load_checkpoint(full.run_dir)
    # cycles at steps 7, 14, 21 (epochs 1, 2, 3): s_k = 1 - 0.5^k, each layer round(s_k n_l) of n_l = 2048, 320
    logged = _layer_sparsity(full.run_dir)
    for t, (a, b) in {
        6: (0, 0),
        7: (1024, 160),
        13: (1024, 160),
        14: (1536, 240),
        20: (1536, 240),
        21: (1792, 280),
        26: (1792, 280),
    }.items():
        assert logged[t - 1] == (a / 2048, b / 320), t
    state = end["state_dict"]
    for key, pruned in (("model.1", 1792), ("model.4", 280)):
        mask = state[f"{key}.parametrizations.weight.0.mask"]
        assert int((~mask).sum()) == pruned
        assert bool((state[f"{key}.parametrizations.weight.original"][~mask] == 0).all())
    assert end["paperhooks"]["plugins"][2]["state"] == {
        "checked": 26
    }  # zeros checked after every step
    for stop in (
        10,
        20,
    ):  # between cycles 1 and 2, and 2 and 3 (mid-epoch: 10 = 7 + 3, 20 = 14 + 6)
        mid = load_checkpoint(full.run_dir, f"step{stop}.ckpt")
        assert 0 < mid["paperhooks"]["sparsity"] < end["paperhooks"]["sparsity"]
        resumed, _ = fit(
            R.load(path, [f"name=resumed{stop}"]),
            resume=str(full.run_dir / "checkpoints" / f"step{stop}.ckpt"),
        )
        again = load_checkpoint(resumed.run_dir)
        assert resumed.module.hooks.ctx.steps_per_epoch == 7  # filled again on resume
        assert_states_close(end["state_dict"], again["state_dict"], atol=0)
        assert_nested_equal(end["optimizer_states"], again["optimizer_states"], "optimizer_states")
        assert_nested_equal(
            end["paperhooks"],
            {**again["paperhooks"], "recipe": end["paperhooks"]["recipe"]},
            "paperhooks",
        )


def test_iterative_pruning_beats_one_shot_to_the_same_sparsity_in_the_same_steps(tmp_path):
    """Han et al. (2015, section 3.3): prune–retrain cycles reach a sparsity at a higher
    accuracy than pruning to it in one step. Digits MLP 64-64-10, 10 epochs of 11 steps: dense
    for 2 epochs, then 90% in 3 cycles 2 epochs apart (epochs 2, 4, 6) or in one shot at
    epoch 2; the same 110 steps, the same optimizer, 4 to 8 epochs of retraining at 90%."""

    def run(seed, schedule):
        raw = {
            "seed": seed,
            "name": schedule["name"],
            "run_dir": str(tmp_path),
            "model": {"name": "mlp", "hidden": [64]},
            "data": {"name": "digits", "batch_size": 128},
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "trainer": {
                "max_epochs": 10,
                "enable_progress_bar": False,
                "check_val_every_n_epoch": 1000,
            },
            "plugins": [schedule],
        }
        built, metrics = fit(R.validate(raw))  # validates the final weights once
        masks = built.module.masks.values()
        n, pruned = sum(m.mask.numel() for m in masks), sum(int((~m.mask).sum()) for m in masks)
        assert (
            pruned == round(0.9 * n) == 4262
        )  # of 64x64 + 64x10 = 4736 weights (global threshold): exact
        return metrics["val/acc"]

    iterative = {
        "name": "iterative-pruning",
        "final_sparsity": 0.9,
        "cycles": 3,
        "begin": 2,
        "every": 2,
        "unit": "epoch",
    }
    one_shot = {"name": "one-shot-pruning", "sparsity": 0.9, "step": 2, "unit": "epoch"}
    gains = [run(seed, iterative) - run(seed, one_shot) for seed in range(3)]
    # measured on 360 validation digits: +0.006, +0.017, +0.031 (seeds 0-2); +0.014 mean over seeds 0-7, 7 wins, 1 tie
    assert sum(g > 0 for g in gains) >= 2, gains
    assert sum(gains) / 3 > 0.005, gains


def test_the_iterative_pruning_recipe_validates_and_its_cycles_fall_inside_training():
    from helpers import ROOT

    recipe = R.load(ROOT / "recipes" / "iterative-pruning.yaml")
    (entry,) = recipe.plugins
    assert entry.name == "iterative-pruning" and entry.config.unit == "epoch"
    s = (
        1437 // recipe.data.config.batch_size
    )  # 22 full batches of 64 an epoch, one optimizer step each
    asked = _asked(entry.cls(entry.config), recipe.trainer.max_epochs * s + 1, s)
    # epochs 5, 8, 11 = steps 110, 176, 242 of 440: s_k = 1 - 0.1^(k/3) = 0.5358, 0.7846, 0.9
    assert asked == pytest.approx({110: 1 - 0.1 ** (1 / 3), 176: 1 - 0.1 ** (2 / 3), 242: 0.9})


# -- many processes ---------------------------------------------------------------------------------------------
DDP = """
seed: 3
name: ddp-pruning
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
trainer: {max_steps: 8, enable_progress_bar: false, limit_val_batches: 0}
plugins:
  - {name: gradual-pruning, final_sparsity: 0.7, begin_step: 0, end_step: 6, frequency: 2}
"""


@pytest.mark.slow
def test_two_processes_hold_identical_masks_and_equal_one_process_under_ddp_and_fsdp2(
    tmp_path, test_plugins
):
    """DDP selects locally on replicated weights; FSDP2 scores each rank's rows and selects
    with ``dist.topk_mask`` (global) or one per layer (uniform). Each rank's probe checks the
    pruned entries after every step and writes its masks at the end."""
    recipe = write_recipe(tmp_path / "d.yaml", DDP)
    schedule = (
        "{name: gradual-pruning, final_sparsity: 0.7, begin_step: 0, end_step: 6, frequency: 2}"
    )
    strategies = {"one": [], "ddp": ["trainer.strategy=ddp"], "fsdp2": ["trainer.strategy=fsdp2"]}
    for allocation in ("", ", {name: uniform-allocation}"):
        probes, runs = {}, {}
        for name, extra in strategies.items():
            if allocation and name == "ddp":
                continue
            out = tmp_path / f"probe-{name}{bool(allocation)}"
            out.mkdir()
            plugins = f"plugins=[{schedule}{allocation}, {{name: mask-probe, out: '{out}'}}]"
            devices = ["trainer.devices=2"] if extra else []
            overrides = [f"name={name}{bool(allocation)}", plugins, *devices, *extra]
            runs[name] = (
                fit_cli(recipe, overrides, cwd=tmp_path)
                if extra
                else fit_here(recipe, overrides, tmp_path)
            )
            probes[name] = [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]
        single = probes.pop("one")
        assert len(single) == 1 and int(single[0]["checked"]) == 8
        for name, (r0, r1) in probes.items():
            assert int(r0["checked"]) == int(r1["checked"]) == 8
            for k in single[0]:
                assert torch.equal(r0[k], r1[k]), (name, k)  # every rank holds the same masks
                assert torch.equal(r0[k], single[0][k]), (
                    name,
                    k,
                )  # those of one process on the global batch
            assert_states_close(
                final_state(runs["one"]), final_state(runs[name]), atol=1e-6, rtol=1e-5
            )
        sparsity = load_checkpoint(runs["fsdp2"])["paperhooks"]["sparsity"]
        assert sparsity == pytest.approx(0.7, abs=0.002)


@pytest.mark.slow
@pytest.mark.full_suite  # the selection path is the gradual-pruning check's above; this adds epoch units
def test_iterative_pruning_in_epochs_on_two_processes_equals_one_process_under_ddp_and_fsdp2(
    tmp_path, test_plugins
):
    """The global batch is fixed, so an epoch is S = 7 optimizer steps on 1 and on 2 processes:
    the cycles (steps 7 and 14) fall on the same steps and select the same global masks (under
    FSDP2 over the shards, with ``dist.topk_mask``)."""
    recipe = write_recipe(
        tmp_path / "d.yaml",
        DDP.replace("batch_size: 64", "batch_size: 200").replace("max_steps: 8", "max_steps: 16"),
    )
    schedule = "{name: iterative-pruning, final_sparsity: 0.75, cycles: 2, begin: 1, every: 1, unit: epoch}"
    probes, runs = {}, {}
    for name in ("one", "ddp", "fsdp2"):
        out = tmp_path / f"probe-{name}"
        out.mkdir()
        overrides = [
            f"name={name}",
            f"plugins=[{schedule}, {{name: mask-probe, out: '{out}'}}]",
            f"run_dir={tmp_path}/runs",
        ]
        if name == "one":  # in this process; the 2 processes through the CLI
            runs[name] = fit(R.load(recipe, overrides))[0].run_dir
        else:
            runs[name] = fit_cli(
                recipe, [*overrides, "trainer.devices=2", f"trainer.strategy={name}"], cwd=tmp_path
            )
        probes[name] = [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]
    (single,) = probes["one"]
    masks = [k for k in single if k != "checked"]
    # global threshold: round(0.75 · 2368) = 1776 of the 64x32 and 32x10 weights pruned
    assert sum(int((~single[k]).sum()) for k in masks) == 1776
    for name in ("ddp", "fsdp2"):
        r0, r1 = probes[name]
        assert int(single["checked"]) == int(r0["checked"]) == int(r1["checked"]) == 16
        for k in masks:
            assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], single[k]), (name, k)
        assert_states_close(final_state(runs["one"]), final_state(runs[name]), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_a_mask_stacked_on_a_reparameterization_under_fsdp2_stops_with_the_reason(tmp_path):
    from paperhooks.testing import paperhooks_cli

    recipe = write_recipe(tmp_path / "d.yaml", DDP)
    plugins = "plugins=[{name: weight-compander}, {name: one-shot-pruning, sparsity: 0.5, step: 0}]"
    proc = paperhooks_cli(
        "fit",
        str(recipe),
        plugins,
        "trainer.devices=2",
        "trainer.strategy=fsdp2",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert (
        "pruning and reparameterization cannot be stacked under FSDP2 (use ddp)"
        in proc.stdout + proc.stderr
    )


# -- export ------------------------------------------------------------------------------------------------------
def test_export_of_a_pruned_run_holds_exact_zeros_and_reports_its_size(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "g.yaml", GRADUAL + f"run_dir: {tmp_path}/runs\n")
    built, _ = fit(R.load(path, ["trainer.max_steps=15"]))
    assert cli.main(["export", str(built.run_dir)]) == 0
    out = built.run_dir / "export"
    weights = load_file(out / "model.safetensors")
    state = load_checkpoint(built.run_dir)["state_dict"]
    for layer, pruned in (("1", 1638), ("4", 256)):
        mask = state[f"model.{layer}.parametrizations.weight.0.mask"]
        assert bool((weights[f"{layer}.weight"][~mask] == 0).all())
        assert int((weights[f"{layer}.weight"] == 0).sum()) == pruned  # no kept weight is exactly 0
    size = read_size(out)
    assert size["layers"]["1.weight"] == {
        "numel": 2048,
        "nonzero": 410,
        "sparsity": pytest.approx(1638 / 2048),
    }
    assert size["layers"]["4.weight"] == {
        "numel": 320,
        "nonzero": 64,
        "sparsity": pytest.approx(256 / 320),
    }
    assert size["pruned"] == {"numel": 2368, "nonzero": 474, "sparsity": pytest.approx(1894 / 2368)}
    # biases 32 + 10 stay dense: 2410 entries, 474 + 42 nonzero; float32 = 4 bytes each
    assert size["model"]["numel"] == 2410 and size["model"]["nonzero"] == 474 + 42
    assert size["model"]["bytes_dense"] == 4 * 2410
    # sparse: 4 bytes per kept weight + one bit per entry of each pruned weight + dense biases
    assert size["model"]["bytes_sparse"] == 4 * 474 + 2048 // 8 + 320 // 8 + 4 * 42
    card = (out / "README.md").read_text()
    assert "## Size and sparsity" in card and "| `1.weight` | 2,048 | 410 | 0.7998 |" in card
    assert "Pruned weights: 474 of 2,368 nonzero, sparsity 0.7998." in card
    assert json.loads((out / "metrics.json").read_text()) is not None


def test_has_masks_tells_pruning_masks_from_other_parametrizations_mask_buffers():
    from torch.nn.utils import parametrize

    from paperhooks.pruning import add_masks, has_masks

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert not has_masks(model.state_dict())
    add_masks(model)
    assert has_masks(model.state_dict())  # "0.parametrizations.weight.0.mask", bool, alone

    class Kept(nn.Module):  # SARA-like: a bool "mask" beside another tensor
        def __init__(self, shape):
            super().__init__()
            self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
            self.register_buffer("frozen", torch.zeros(shape))

        def forward(self, w):
            return torch.where(self.mask, w, self.frozen)

    other = nn.Sequential(nn.Linear(4, 3))
    parametrize.register_parametrization(other[0], "weight", Kept(other[0].weight.shape))
    assert not has_masks(other.state_dict())
    state = dict(model.state_dict())
    state["0.parametrizations.weight.0.mask"] = state["0.parametrizations.weight.0.mask"].float()
    state["2.parametrizations.weight.0.mask"] = state["2.parametrizations.weight.0.mask"].float()
    assert not has_masks(state)  # a float "mask" is not a keep-mask
