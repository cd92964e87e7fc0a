"""Tensor-parallel ranks for tests/test_shm_collectives.py: `python -m tests.support.shm_rank RANK SIZE PORT MODE
[OUT]`. A rank past 0 joins rank 0's group (shared memory, slots of SLOT bytes) and then:
- `exchange`: makes the calls rank 0 makes (`calls`), checks its own results, exits 0 (3 on a wrong result);
- `die`: exits at once; `idle`: never calls;
- `orphan`: waits in a sum rank 0 never joins, and writes to OUT what ended the wait.
As rank 0, `lead-and-die` starts rank 1 in `orphan` mode, joins the group, prints rank 1's pid and exits."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import torch

from engine.errors import EngineDeadError
from engine.parallel.group import TPGroup, open_store

SLOT = 4096  # bytes: a [8, 64] fp32 part fits twice, a [32, 64] one does not
ROUNDS = 300  # lockstep calls of values that change every call, with ranks now and then behind the others


def part(rank: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rank `rank`'s part of a call: values every rank can compute for every other."""
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(shape, generator=generator).to(dtype)


def expected_sum(size: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    total = part(0, shape, dtype, seed) + part(1, shape, dtype, seed)
    for r in range(2, size):
        total += part(r, shape, dtype, seed)
    return total


def calls(group: TPGroup) -> list[torch.Tensor]:
    """The calls of `exchange`, in order; raises AssertionError where this rank's result is wrong. Returns the first
    four results (sums of a [8, 64] fp32, a [3, 5] bf16 and a [32, 64] fp32 part, and a gather)."""
    results = []
    for shape, dtype in (((8, 64), torch.float32), ((3, 5), torch.bfloat16), ((32, 64), torch.float32)):
        results.append(group.all_reduce(part(group.rank, shape, dtype)).clone())
        assert torch.equal(results[-1], expected_sum(group.size, shape, dtype))
    gathered = group.gather_columns(part(group.rank, (4, 6), torch.float32), 6 * group.size - 1).clone()
    if group.rank == 0:
        assert torch.equal(gathered, torch.cat([part(r, (4, 6), torch.float32) for r in range(group.size)],
                                               dim=-1)[..., :6 * group.size - 1])
    results.append(gathered)
    for seed in range(1, ROUNDS + 1):
        if seed % (7 + 4 * group.rank) == 0:  # (a reader behind the others: a bank reused too early shows)
            time.sleep(0.002)
        if seed % 3 == 0:
            got = group.gather_columns(part(group.rank, (2, 8), torch.float32, seed), 8 * group.size)
            if group.rank == 0:
                assert torch.equal(got, torch.cat([part(r, (2, 8), torch.float32, seed) for r in range(group.size)],
                                                  dim=-1))
        else:
            got = group.all_reduce(part(group.rank, (4, 16), torch.float32, seed))
            assert torch.equal(got, expected_sum(group.size, (4, 16), torch.float32, seed)), seed
    return results


def main() -> None:
    rank, size, port, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if mode == "lead-and-die":
        store = open_store(0, 2, 0)
        child = subprocess.Popen(  # (not on this one's pipes: the test reads them to their end)
            [sys.executable, "-m", "tests.support.shm_rank", "1", "2", str(store.port), "orphan", sys.argv[5]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        group = TPGroup(store, 0, 2, torch.device("cpu"), child_pids=(child.pid,), slot_bytes=SLOT)
        assert group.shm is not None, "the test is of a shared-memory wait"
        deadline = time.monotonic() + 30
        while group.shm.counters()[1] < 1 and time.monotonic() < deadline:  # (rank 1 is in its wait)
            time.sleep(0.01)
        print(child.pid, flush=True)
        os._exit(0)
    group = TPGroup(open_store(rank, size, port), rank, size, torch.device("cpu"), parent_pid=os.getppid())
    code = 0
    if mode == "exchange":
        try:
            calls(group)
        except AssertionError:
            code = 3
    elif mode == "idle":
        time.sleep(60)
    elif mode == "orphan":
        try:
            group.all_reduce(torch.ones(4))
            outcome = "returned"
        except EngineDeadError as exc:
            outcome = str(exc)
        pathlib.Path(sys.argv[5]).write_text(outcome)
    sys.stdout.flush()
    os._exit(code)  # (no teardown of Gloo's threads)


if __name__ == "__main__":
    main()
