"""A tensor-parallel rank past 0 for tests/test_shm_collectives.py: `python -m tests.support.shm_rank RANK SIZE PORT
MODE`. It joins rank 0's group (shared memory, slots of SLOT bytes) and makes the calls rank 0 makes (`exchange`:
sums, a sum too large for a slot, gathers), or exits at once (`die`), or joins and then never calls (`idle`)."""

from __future__ import annotations

import os
import sys
import time

import torch

from engine.parallel.group import TPGroup, open_store

SLOT = 4096  # bytes: a [8, 64] fp32 part fits twice, a [32, 64] one does not


def part(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s part of a call: values every rank can compute for every other."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=generator).to(dtype)


def calls(group: TPGroup) -> list[torch.Tensor]:
    """The calls of `exchange`, in order; their results on this rank."""
    results = []
    for shape, dtype in (((8, 64), torch.float32), ((3, 5), torch.bfloat16), ((32, 64), torch.float32)):
        results.append(group.all_reduce(part(group.rank, shape, dtype)).clone())
    results.append(group.gather_columns(part(group.rank, (4, 6), torch.float32), 6 * group.size - 1).clone())
    return results


def main() -> None:
    rank, size, port, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    group = TPGroup(open_store(rank, size, port), rank, size, torch.device("cpu"), parent_pid=os.getppid())
    if mode == "exchange":
        calls(group)
    elif mode == "idle":
        time.sleep(60)
    sys.stdout.flush()
    os._exit(0)  # (no teardown of Gloo's threads)


if __name__ == "__main__":
    main()
