"""The collectives of CPU ranks through shared memory (engine.parallel.shm_collectives): rank 0 in this process, the
others as processes of tests/support/shm_rank.py. Sums are added in rank order on every rank, a part too large for
a slot goes through Gloo, rank 0 gathers, and a wait ends when a rank is gone or the group is aborted."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from engine.errors import EngineDeadError
from engine.parallel.group import TPGroup, open_store
from tests.support.shm_rank import SLOT, calls, part


def _group(size: int, mode: str, shared_memory: bool = True) -> tuple[TPGroup, list[subprocess.Popen[bytes]]]:
    store = open_store(0, size, 0)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.support.shm_rank", str(r), str(size), str(store.port),
                               mode]) for r in range(1, size)]
    group = TPGroup(store, 0, size, torch.device("cpu"), shared_memory, tuple(p.pid for p in procs), slot_bytes=SLOT)
    return group, procs


@pytest.mark.parametrize("size", [2, 3])
def test_sums_in_rank_order_gathers_and_gloo_for_what_does_not_fit(size: int) -> None:
    group, procs = _group(size, "exchange")
    try:
        assert group.shm is not None and group.shm.slot_bytes == SLOT
        reduced_8, reduced_bf16, reduced_32, gathered = calls(group)
        for got, shape, dtype in ((reduced_8, (8, 64), torch.float32), (reduced_bf16, (3, 5), torch.bfloat16),
                                  (reduced_32, (32, 64), torch.float32)):
            expected = part(0, shape, dtype) + part(1, shape, dtype)
            for r in range(2, size):
                expected += part(r, shape, dtype)
            assert torch.equal(got, expected)  # bit for bit: the same additions in the same order
        assert torch.equal(gathered, torch.cat([part(r, (4, 6), torch.float32) for r in range(size)],
                                               dim=-1)[..., :6 * size - 1])
        assert group.shm.counters() == [3] * size  # the [32, 64] sum (8 KB) went through Gloo
        assert [p.wait(30) for p in procs] == [0] * (size - 1)
    finally:
        for p in procs:
            p.kill()


def test_without_shared_memory_the_group_exchanges_through_gloo() -> None:
    group, procs = _group(2, "exchange", shared_memory=False)
    try:
        assert group.shm is None
        calls(group)
        assert procs[0].wait(30) == 0
    finally:
        procs[0].kill()


def test_a_wait_ends_when_a_rank_is_gone_or_the_group_is_aborted() -> None:
    group, procs = _group(2, "die")
    try:
        procs[0].wait(30)  # (reaped: a zombie would still exist)
        with pytest.raises(EngineDeadError, match="a peer process is gone"):
            group.all_reduce(torch.ones(4))
    finally:
        procs[0].kill()
    group, procs = _group(2, "idle")
    try:
        threading.Timer(0.3, group.abort).start()
        with pytest.raises(EngineDeadError, match="aborted"):
            group.all_reduce(torch.ones(4))
    finally:
        procs[0].kill()
        procs[0].wait()
