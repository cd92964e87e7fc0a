"""The collectives of CPU ranks through shared memory (engine.parallel.shm_collectives): rank 0 in this process, the
others as processes of tests/support/shm_rank.py. Sums are added in rank order on every rank, a part too large for
a slot goes through Gloo, rank 0 gathers, and a wait ends when a rank is gone or the group is aborted."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine.errors import EngineDeadError
from engine.parallel.group import TPGroup, open_store
from tests.support.shm_rank import ROUNDS, SLOT, calls


def _group(size: int, mode: str, shared_memory: bool = True) -> tuple[TPGroup, list[subprocess.Popen[bytes]]]:
    store = open_store(0, size, 0)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.support.shm_rank", str(r), str(size), str(store.port),
                               mode]) for r in range(1, size)]
    group = TPGroup(store, 0, size, torch.device("cpu"), shared_memory, tuple(p.pid for p in procs), slot_bytes=SLOT)
    return group, procs


@pytest.mark.parametrize("size", [2, 3])
def test_sums_in_rank_order_gathers_and_gloo_for_what_does_not_fit(size: int) -> None:
    """Every rank checks its own results (the others exit 3 on a wrong one): the same sums bit for bit, added in rank
    order; rank 0 gathers. Then ROUNDS calls of values that change every call, with ranks now and then behind."""
    group, procs = _group(size, "exchange")
    try:
        assert group.shm is not None and group.shm.slot_bytes == SLOT
        calls(group)  # (raises AssertionError on a wrong result here)
        # every call but the [32, 64] sum (8 KB, through Gloo) went through shared memory
        assert group.shm.counters() == [3 + ROUNDS] * size
        assert [p.wait(60) for p in procs] == [0] * (size - 1)
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


def test_a_rank_waiting_when_rank_0_dies_ends_its_wait(tmp_path) -> None:
    """Rank 0 joins the group and exits; rank 1, waiting for it in a sum, sees its parent change and ends the wait
    (it would otherwise wait out the collective timeout)."""
    out = tmp_path / "outcome"
    lead = subprocess.run([sys.executable, "-m", "tests.support.shm_rank", "0", "2", "0", "lead-and-die", str(out)],
                          capture_output=True, text=True, timeout=60, check=True)
    orphan = int(lead.stdout.split()[-1])
    for _ in range(300):
        if out.exists() and out.read_text():
            break
        time.sleep(0.05)
    try:
        assert "a peer process is gone" in out.read_text()
    finally:  # (only if that pid is still the rank: it may have ended and been reused)
        with contextlib.suppress(OSError):
            if b"tests.support.shm_rank" in pathlib.Path(f"/proc/{orphan}/cmdline").read_bytes():
                os.kill(orphan, signal.SIGKILL)
