"""The ranks' collectives: a torch.distributed process group of its own (no global default group, so a
process may hold several engines), Gloo between CPU processes over 127.0.0.1, NCCL between CUDA devices."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# a collective that waits longer than this for a peer fails (a rank that died or hangs ends the step)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
STORE_HOST = "127.0.0.1"


def threads_per_rank(size: int) -> int:
    """CPU threads for each of `size` ranks sharing this process's CPUs: an equal share, at least one, so the group's
    threads do not outnumber the cores (by default torch gives every rank all of them)."""
    return max(1, len(os.sched_getaffinity(0)) // size)


def open_store(rank: int, size: int, port: int) -> dist.TCPStore:
    """Rank 0 serves the rendezvous store (`port` 0: any free one; read it back from `.port`), the others join."""
    return dist.TCPStore(STORE_HOST, port, size, rank == 0, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


class TPGroup:
    """One rank's end of the group; every rank calls each collective in the same order with tensors of one shape."""

    def __init__(self, store: dist.TCPStore, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.pg: Any  # (torch's stubs type neither backend's constructor nor its options)
        if device.type == "cuda":
            nccl: Any = dist.ProcessGroupNCCL  # absent from CPU builds of torch
            options = nccl.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            self.pg = nccl(store, rank, size, options)
        else:
            gloo: Any = dist.ProcessGroupGloo
            options = gloo._Options()
            options._timeout = COLLECTIVE_TIMEOUT
            options._devices = [gloo.create_device(hostname=STORE_HOST)]
            self.pg = gloo(store, rank, size, options)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place: every rank gets the same sum, added in rank order whatever the
        tensor's size. (Two ranks' sum has one order; past two a ring all-reduce would add an element's parts
        from a rank that depends on where the element falls, so on the batch: the ranks' parts are gathered and
        added here instead, which keeps a row's result independent of the rows beside it.)"""
        if self.size <= 2:
            self.pg.allreduce([tensor]).wait()
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.pg.allgather([parts], [tensor]).wait()
        total = parts[0]
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def gather_columns(self, tensor: torch.Tensor, columns: int) -> torch.Tensor:
        """Rank 0: every rank's `tensor` side by side along the last dim, cut to `columns`; other ranks: `tensor`."""
        tensor = tensor.contiguous()
        if self.rank != 0:
            self.pg.gather([], [tensor], dist.GatherOptions()).wait()
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.pg.gather([parts], [tensor], dist.GatherOptions()).wait()
        return torch.cat(parts, dim=-1)[..., :columns]
