"""The collectives plugins use: exact on 2 gloo processes, the identity on one."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from paperhooks import dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_helpers_are_identities_on_one_process():
    x = torch.tensor([1.0, 2.0, 4.0])
    glob, mine = dist.all_gather_cat(x)
    assert torch.equal(glob, x) and glob[mine].tolist() == [1.0, 2.0, 4.0]
    assert dist.global_sum(x).item() == 7.0 and dist.global_mean(x).item() == pytest.approx(7 / 3)
    assert dist.world_size() == 1 and dist.rank() == 0


def test_step_generator_depends_on_seed_step_and_stream_only():
    draw = lambda *a: torch.rand(3, generator=dist.step_generator(*a))  # noqa: E731
    assert torch.equal(draw(1, 5, "a"), draw(1, 5, "a"))
    assert not torch.equal(draw(1, 5, "a"), draw(1, 6, "a"))
    assert not torch.equal(draw(1, 5, "a"), draw(1, 5, "b"))
    assert not torch.equal(draw(1, 5, "a"), draw(2, 5, "a"))


def test_collectives_on_two_processes_with_uneven_rows(tmp_path):
    from _dist_worker import run

    mp.start_processes(
        run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    # rank 0 holds [0, 1], rank 1 holds [10, 11, 12]
    expected = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
    for r in (r0, r1):
        assert torch.equal(r["global"], expected)
        assert r["sum"].item() == 34.0 and r["mean"].item() == pytest.approx(34 / 5)
        assert r["max"].item() == 12.0 and r["bcast"].item() == 1.0 and r["world"].item() == 2
    assert r0["mine"].tolist() == [0, 2] and r1["mine"].tolist() == [2, 5]
    assert torch.equal(r0["draw"], r1["draw"])  # shared randomness agrees across ranks
