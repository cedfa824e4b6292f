"""The per-objective gradient engine of the gradient-surgery family (paperhooks.gradients)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from paperhooks.gradients import (
    GRAM_BLOCK,
    Block,
    Engine,
    GradientSet,
    min_norm_2,
    min_norm_weights,
)
from paperhooks.plugin import Plugin, hookimpl


def hand_set() -> GradientSet:
    # g_1 = [1, 0], g_2 = [-1, 1]: C = [[1, -1], [-1, 2]]
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    return GradientSet(
        G,
        ["a", "b"],
        torch.tensor([0.5, 2.0], dtype=torch.float64),
        blocks=[Block("w", 0, 2, torch.Size([2]))],
    )


def test_gram_norms_dot_and_combinations_by_hand():
    s = hand_set()
    torch.testing.assert_close(
        s.gram(), torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(s.norms(), torch.tensor([1.0, math.sqrt(2)], dtype=torch.float64))
    torch.testing.assert_close(
        s.dot(torch.tensor([2.0, 3.0])), torch.tensor([2.0, 1.0], dtype=torch.float64)
    )
    d = s.sum()  # [1, 0] + [-1, 1] = [0, 1]
    assert torch.equal(d.vector, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(d.weights, torch.tensor([1.0, 1.0], dtype=torch.float64))
    # project g_2 off g_1: g_2 - (<g_2, g_1>/|g_1|^2) g_1 = [-1, 1] + [1, 0] = [0, 1]
    p = s.project_out(1, 0)
    torch.testing.assert_close(p.rows, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(
        p.gram(), torch.eye(2, dtype=torch.float64)
    )  # from C alone, no new products
    # the weights of a direction are over the ORIGINAL gradients: [1, 0] + [0, 1] = 2 g_1 + g_2
    torch.testing.assert_close(p.sum().weights, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.equal(s.select(["b"]).rows, torch.tensor([[-1.0, 1.0]]))
    assert torch.equal(s.view("w"), s.rows)
    assert s.with_rows(s.rows * 2).sum().weights is not None  # carried, but NaN: unknown
    assert torch.isnan(s.with_rows(s.rows * 2).sum().weights).all()
    assert torch.equal(s.rows, torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))  # nothing changed in place


def test_the_gram_matrix_of_long_rows_is_close_to_float64():
    """On CPU the Gram matrix is summed over column blocks in float64: within 1e-5 of the
    float64 product on 2M columns (measured 1.2e-6), where one float32 product was ~2e-4 off."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 32 * GRAM_BLOCK + 5, generator=g) + 0.5  # mean 0.5: large inner products
    exact = rows.double() @ rows.double().T
    gram = GradientSet(rows, ["a", "b", "c", "d"], torch.zeros(4)).gram()
    # (rows @ rows.T).double(), one float32 product, was 2.1e-4 off here with torch 2.14.1's
    # CPU BLAS; not asserted, as it is the BLAS's behaviour, not paperhooks'
    assert gram.dtype == torch.float64 and (gram - exact).abs().max() / exact.abs().max() < 1e-5


def test_inner_products_with_a_long_vector_are_close_to_float64():
    """``dot`` sums the same column blocks in float64 as the Gram matrix: ⟨g_k, v⟩ within 1e-6
    of the float64 value on 2M columns (measured 1.8e-7), and close to the Gram matrix's row when v is a row."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 32 * GRAM_BLOCK + 7, generator=g) + 0.5
    v = torch.randn(rows.shape[1], generator=g) + 0.5
    s = GradientSet(rows, ["a", "b", "c"], torch.zeros(3))
    exact = rows.double() @ v.double()
    dots = s.dot(v)
    assert dots.dtype == torch.float64 and dots.shape == (3,)
    # one float32 product was 3.2e-6 off here with torch 2.14.1's CPU BLAS (not asserted)
    assert ((dots - exact).abs().max() / exact.abs().max()).item() < 1e-6
    # ⟨g_k, g_1⟩ is the Gram matrix's column 1 (a matrix-vector product within each block, not
    # the Gram's matrix-matrix one, so equal to rounding: 6e-7 relative here)
    torch.testing.assert_close(s.dot(rows[1]), s.gram()[:, 1], rtol=5e-6, atol=0)
    # a Direction is read through its vector; short rows take one product, as before
    assert torch.equal(s.dot(s.combine([1.0, 0.0, 0.0])), s.dot(rows[0]))
    short = hand_set()
    torch.testing.assert_close(short.dot(short.rows[0]), short.gram()[:, 0])


def test_bad_calls_name_what_is_allowed():
    s = hand_set()
    with pytest.raises(ValueError, match="combine needs 2 weights"):
        s.combine([1.0])
    with pytest.raises(KeyError, match="no objective 'z'.*\\['a', 'b'\\]"):
        s.select(["z"])
    with pytest.raises(KeyError, match="no parameter 'v'"):
        s.view("v")
    cols = GradientSet(torch.ones(2, 3), ["a", "b"], torch.ones(2), layout="columns")
    with pytest.raises(RuntimeError, match="needs the full layout"):
        cols.view("w")


def test_min_norm_of_two_objectives_closed_forms():
    # γ* = (<v,v> - <u,v>) / |u - v|^2, clipped: g_1 = (1,0), g_2 = (0,1) → 1/2
    assert float(min_norm_2(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0))) == 0.5
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(min_norm_weights(C), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # g_1 = (1,0), g_2 = (2,0): γ* = (4 - 2) / 1 = 2 → clipped to 1, all weight on g_1
    C = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    torch.testing.assert_close(min_norm_weights(C), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # g_1 = (1,0), g_2 = (-1, 1): γ* = (2 + 1) / 5 = 0.6; d = 0.6 g_1 + 0.4 g_2 = (0.2, 0.4), d ⟂ g_1 - g_2
    C = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
    torch.testing.assert_close(min_norm_weights(C), torch.tensor([0.6, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_min_norm_weights_agree_with_torchjd_mgda(k):
    torchjd = pytest.importorskip("torchjd")
    g = torch.Generator().manual_seed(k)
    G = torch.randn(k, 20, generator=g, dtype=torch.float64)
    G[1:] -= 0.8 * G[0]  # conflicting
    ours = min_norm_weights(G @ G.T, max_iter=5000, tol=1e-10) @ G
    ref = torchjd.aggregation.MGDA(epsilon=1e-10, max_iters=100000)(G)
    if k <= 5:
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # Frank–Wolfe converges sublinearly: at K = 8 both solvers stop near, not at, the minimum
    # of ||Σ α_k g_k|| over the simplex; the norms agree to 0.1% (and to 1% with the paper's
    # defaults, 250 iterations and tolerance 1e-5, measured 0.8% at K = 8)
    default = min_norm_weights(G @ G.T) @ G
    assert abs(ours.norm() - ref.norm()) <= 1e-3 * ref.norm()
    assert abs(default.norm() - ref.norm()) <= 1e-2 * ref.norm()


# -- the engine on one process ---------------------------------------------------------------------


def linear_objectives(w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    z = x @ w
    return {"mean": z.mean(), "square": z.pow(2).mean()}


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_rows_are_the_gradients_of_each_objective_worked_out_by_hand(mode):
    # L_1 = mean(x·w): ∇ = mean(x);  L_2 = mean((x·w)^2): ∇ = mean(2 (x·w) x)
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    engine = Engine(mode)
    G = engine.per_objective_gradients(list(linear_objectives(w, x).values()), [w])
    z = torch.tensor([1.0, -1.0, -4.0])
    want = torch.stack(
        [x.mean(0), (2 * z[:, None] * x).mean(0)]
    )  # [[2/3, 1], [2·(1-1+0)/3, 2·(0-1-8)/3]]
    torch.testing.assert_close(G, want)
    torch.testing.assert_close(want, torch.tensor([[2 / 3, 1.0], [0.0, -6.0]]))


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_rows_are_zero_where_an_objective_or_a_parameter_has_no_gradient(mode):
    # the rows are allocated uninitialized: a constant objective and an unused parameter must
    # still come back as exact zeros (filled with NaN first would show any entry left unwritten)
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    unused = nn.Parameter(torch.tensor([5.0, 5.0, 5.0]))
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    objs = linear_objectives(w, x)
    values = [objs["mean"], torch.tensor(3.0), objs["square"]]  # the middle one is a constant
    torch.empty = _nan_empty(torch.empty)
    try:
        G = Engine(mode).per_objective_gradients(values, [w, unused])
    finally:
        torch.empty = torch.empty.original
    want = torch.tensor([[2 / 3, 1.0, 0, 0, 0], [0, 0, 0, 0, 0], [0.0, -6.0, 0, 0, 0]])
    torch.testing.assert_close(G, want)


def _nan_empty(empty):
    def nan_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    nan_empty.original = empty
    return nan_empty


def test_all_finite_by_hand():
    from paperhooks.gradients import _all_finite

    assert _all_finite(torch.tensor([1.0, -2.0, 3.0]))
    assert not _all_finite(torch.tensor([1.0, float("nan"), 3.0]))
    assert not _all_finite(torch.tensor([1.0, float("inf")]))
    assert not _all_finite(torch.tensor([float("inf"), float("-inf")]))  # the sum is NaN
    assert _all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows, every entry is finite
    assert _all_finite(torch.full((4,), 60000.0, dtype=torch.float16))  # 240000 > fp16's max
    assert not _all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))


def test_a_non_finite_direction_raises_naming_the_objectives():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])

    def poison(grads, ctx):
        return grads.combine(torch.tensor([float("nan"), 1.0], dtype=torch.float64))

    with pytest.raises(
        FloatingPointError, match=r"non-finite direction \(objectives \['mean', 'square'\]"
    ):
        Engine("loop").run(linear_objectives(w, x), [("w", w)], {"w"}, [poison], ctx=None)


class Recorder(Plugin):
    family = "gradient-surgery"
    seen: list

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = []

    @hookimpl
    def surgery_combine(self, grads, ctx):
        self.seen.append(grads)
        return None


def test_surgery_never_sees_the_gradient_of_the_summed_loss():
    """The classic mistake (one backward of the sum, then "surgery" on it) is impossible:
    the plugin receives one row per objective, each the gradient of that objective alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    from paperhooks.functional import Hooks

    rec = Recorder()
    rec.name = "rec"
    hooks = Hooks([rec])
    hooks.begin_step(0)

    def objectives():
        out = net(x)
        return {"ce": F.cross_entropy(out, y), "l2": 0.3 * out.pow(2).mean()}

    hooks.surgery_gradients(objectives(), net)
    (gset,) = rec.seen
    params = list(net.parameters())
    for k, name in enumerate(["ce", "l2"]):
        net.zero_grad()
        objectives()[name].backward()
        alone = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(gset.rows[k], alone)
    net.zero_grad()
    sum(objectives().values()).backward()
    summed = torch.cat([p.grad.reshape(-1) for p in params])
    assert not any(torch.allclose(row, summed) for row in gset.rows)
    torch.testing.assert_close(gset.rows.sum(0), summed)
    # and p.grad now holds the plain sum (the recorder returned None)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, summed)


def test_cpu_rows_are_reused_only_when_nothing_else_holds_them():
    """On CPU the engine writes a step's [K, P] rows into the previous step's buffer (a fresh
    one page-faults again), but only when no plugin kept that step's GradientSet, rows or a
    view: what a plugin kept must never change under it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(net.parameters())

    def values():
        out = net(torch.randn(6, 3))
        return [out[:, 0].pow(2).mean(), out[:, 1].abs().mean()]

    engine = Engine("loop")
    first = engine.per_objective_gradients(values(), params)
    ptr = first.data_ptr()
    del first
    second = engine.per_objective_gradients(values(), params)
    assert second.data_ptr() == ptr  # nothing held the first rows: reused
    row, saved = second[0], second[0].clone()
    third = engine.per_objective_gradients(values(), params)  # a row of the second is held
    assert third.data_ptr() != second.data_ptr() and torch.equal(row, saved)
    del row, second
    kept = third  # the tensor itself is held under another name
    fourth = engine.per_objective_gradients(values(), params)
    assert fourth.data_ptr() != kept.data_ptr()
    # through the core's step: a plugin that keeps every GradientSet sees each step's own rows
    from paperhooks.functional import Hooks

    rec = Recorder()
    rec.name = "rec"
    hooks = Hooks([rec])
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    want = []
    for step in range(3):
        hooks.begin_step(step)
        out = net(x)
        objectives = {"ce": F.cross_entropy(out, y), "l2": 0.3 * out.pow(2).mean()}
        rows = []
        for name in objectives:
            grads = torch.autograd.grad(objectives[name], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        want.append(torch.stack(rows))
        hooks.surgery_gradients(objectives, net)
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
    assert len({g.rows.data_ptr() for g in rec.seen}) == 3
    for gset, rows in zip(rec.seen, want, strict=True):
        torch.testing.assert_close(gset.rows, rows, rtol=0, atol=0)


class HeadOnlyFirst(Plugin):
    """Acts on the last layer only and follows the first objective: α = [1, 0]."""

    family = "gradient-surgery"

    @hookimpl
    def surgery_parameters(self, module, names):
        return [n for n in names if n.startswith("2.")]

    @hookimpl
    def surgery_combine(self, grads, ctx):
        assert grads.parameter_names == ["2.weight", "2.bias"] and grads.rows.shape[1] == 4 * 2 + 2
        return grads.combine([1.0, 0.0])


class HeadOnlyEdit(HeadOnlyFirst):
    """An element-wise edit on the head: no known weights, so the rest gets the plain sum."""

    @hookimpl
    def surgery_combine(self, grads, ctx):
        return grads.with_rows(grads.rows * 0.0)


@pytest.mark.parametrize(("cls", "body"), [(HeadOnlyFirst, "first"), (HeadOnlyEdit, "sum")])
def test_parameters_outside_the_surgery_set_follow_the_same_weights_or_the_sum(cls, body):
    from paperhooks.functional import Hooks

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))

    def objectives():
        out = net(x)
        return {"ce": F.cross_entropy(out, y), "l2": 0.3 * out.pow(2).mean()}

    plugin = cls()
    plugin.name = "head"
    Hooks([plugin]).surgery_gradients(objectives(), net)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    o = objectives()
    (o["ce"] if body == "first" else o["ce"] + o["l2"]).backward()
    for a, p in zip(got[:2], list(net.parameters())[:2], strict=True):
        torch.testing.assert_close(a, p.grad)
    if body == "first":
        for a, p in zip(got[2:], list(net.parameters())[2:], strict=True):
            torch.testing.assert_close(a, p.grad)
    else:
        assert all(bool((a == 0).all()) for a in got[2:])


class ReturnsTensor(Plugin):
    family = "gradient-surgery"

    @hookimpl
    def surgery_combine(self, grads, ctx):
        return grads.rows.sum(0)


def test_a_wrong_return_type_names_the_plugin_and_what_is_allowed():
    from paperhooks.functional import Hooks

    net = nn.Linear(2, 1)
    plugin = ReturnsTensor()
    plugin.name = "oldstyle"
    out = net(torch.ones(3, 2))
    with pytest.raises(
        TypeError, match="'oldstyle' returned Tensor; return a GradientSet, a Direction"
    ):
        Hooks([plugin]).surgery_gradients({"a": out.mean(), "b": out.pow(2).mean()}, net)


def test_layout_is_columns_only_when_every_plugin_allows_it():
    from paperhooks.functional import Hooks

    class Ok(Recorder):
        columns_ok = True

    a, b = Ok(), Recorder()
    a.name, b.name = "ok", "rec"
    assert Hooks([a]).surgery_layout == "columns"
    assert Hooks([a, b]).surgery_layout == "full"


# -- two processes -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_direction_in_both_layouts(tmp_path):
    """Rank r holds half of the batch; the engine's gradients, Gram matrix, MGDA weights and
    final direction equal one process on the whole batch, with the full all-reduce and with the
    column split (reduce-scatter + K×K all-reduce + one all-reduce of P)."""
    import _surgery_worker as W

    mp.start_processes(W.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for surgery in ("all", "head"):
        net, x, y = W.model_and_batch(None)
        named = list(net.named_parameters())
        chosen = {n for n, _ in named} if surgery == "all" else {"2.weight", "2.bias"}
        named = [x for x in named if x[0] in chosen] + [x for x in named if x[0] not in chosen]
        seen = {}

        def record(grads, ctx, seen=seen):
            seen["gram"] = grads.gram()
            return None

        ref = Engine().run(
            W.objectives(net, x, y), named, chosen, [record, *W.mgda_chain()], ctx=None
        )
        p_s = sum(p.numel() for n, p in named if n in chosen)
        for layout in ("full", "columns"):
            for r, res in enumerate(ranks):
                got = res[f"{layout}/{surgery}"]
                where = f"{layout} layout, surgery on {surgery}, rank {r}"
                torch.testing.assert_close(
                    got["gram"], seen["gram"], atol=1e-7, rtol=1e-5, msg=where
                )
                torch.testing.assert_close(
                    got["weights"], ref.weights, atol=1e-7, rtol=1e-6, msg=where
                )
                torch.testing.assert_close(
                    got["direction"], ref.vector, atol=1e-6, rtol=1e-5, msg=where
                )
                width = p_s if layout == "full" else -(-p_s // 2)
                assert int(got["width"]) == width, where
        # identical on both ranks
        for layout in ("full", "columns"):
            assert torch.equal(
                ranks[0][f"{layout}/{surgery}"]["direction"],
                ranks[1][f"{layout}/{surgery}"]["direction"],
            )
    # bytes: the full layout all-reduces K×P; the column split reduce-scatters K×P (padded) and
    # all-reduces the K×K Gram matrix and one P-vector (plus the K losses)
    k, p = 3, sum(p.numel() for p in W.model_and_batch(None)[0].parameters())
    full, cols = ranks[0]["full/all"]["traffic"], ranks[0]["columns/all"]["traffic"]
    assert full == {"all_reduce": 4 * k * (p + 1)}  # the K losses ride along as one column
    assert cols == {
        "reduce_scatter": 4 * k * 2 * -(-p // 2),
        "all_reduce": 8 * k + 8 * k * k + 4 * p,
    }
