"""The ranks' collectives: a torch.distributed process group of its own (no global default group, so a
process may hold several engines), NCCL between CUDA devices; between CPU processes shared memory
(engine.parallel.shm_collectives), and Gloo over 127.0.0.1 for what does not fit it or where it cannot be had."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from engine.kernels import shm_sync_kernel
from engine.parallel.shm_collectives import SLOT_BYTES, ShmCollectives, create_file

log = logging.getLogger(__name__)

# a collective that waits longer than this for a peer fails (a rank that died or hangs ends the step)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
STORE_HOST = "127.0.0.1"
SHM_KEY = "tandem/tp/shm"  # the shared-memory file's path, or "" where the ranks exchange through Gloo


def threads_per_rank(size: int) -> int:
    """CPU threads for each of `size` ranks sharing this process's CPUs: an equal share, at least one, so the group's
    threads do not outnumber the cores (by default torch gives every rank all of them)."""
    return max(1, len(os.sched_getaffinity(0)) // size)


def open_store(rank: int, size: int, port: int) -> dist.TCPStore:
    """Rank 0 serves the rendezvous store (`port` 0: any free one; read it back from `.port`), the others join."""
    return dist.TCPStore(STORE_HOST, port, size, rank == 0, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


class TPGroup:
    """One rank's end of the group; every rank calls each collective in the same order with tensors of one shape."""

    def __init__(self, store: dist.TCPStore, rank: int, size: int, device: torch.device,
                 shared_memory: bool = True, child_pids: tuple[int, ...] = (), parent_pid: int = 0,
                 slot_bytes: int = SLOT_BYTES) -> None:
        """`shared_memory` and `slot_bytes` (rank 0's say): CPU ranks exchange their parts of up to `slot_bytes`
        through a file in /dev/shm where they can (engine.parallel.shm_collectives), else through Gloo; a wait there
        ends when one of `child_pids` is gone (rank 0: the other ranks) or the parent is no longer `parent_pid`."""
        self.rank, self.size, self.device = rank, size, device
        self.shm: ShmCollectives | None = None
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
            self.shm = self._open_shared_memory(store, shared_memory and slot_bytes, child_pids, parent_pid)

    def _open_shared_memory(self, store: dist.TCPStore, slot_bytes: int, child_pids: tuple[int, ...],
                            parent_pid: int) -> ShmCollectives | None:
        """Rank 0 makes the file and names it in the store; every rank maps it; then (a Gloo all-reduce, also the
        barrier after which rank 0 unlinks it) every rank uses it, or none does."""
        path, shm = "", None
        try:
            if self.rank == 0:
                if slot_bytes and shm_sync_kernel() is not None:
                    try:
                        path = create_file(self.size, slot_bytes)
                    except OSError as exc:
                        log.warning("no shared-memory file for the tensor-parallel ranks: %s", exc)
                store.set(SHM_KEY, path)
            else:
                path = store.get(SHM_KEY).decode()
            if path:
                try:
                    shm = ShmCollectives(path, self.rank, self.size, COLLECTIVE_TIMEOUT.total_seconds(), child_pids,
                                         parent_pid)
                except OSError as exc:
                    log.warning("tensor-parallel rank %d cannot map %s: %s", self.rank, path, exc)
            mapped = torch.tensor([0 if shm is None else 1], dtype=torch.int64)
            self.pg.allreduce([mapped]).wait()
        finally:  # (a rank that failed meanwhile leaves no file behind either)
            if self.rank == 0 and path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if int(mapped) != self.size:
            if self.rank == 0 and slot_bytes:
                log.warning("tensor-parallel ranks exchange through Gloo: %s",
                            "not every rank could map the shared-memory file" if path else "no shared memory")
            return None
        return shm

    def abort(self) -> None:
        """A rank is gone: every wait in a shared-memory exchange ends, now and later (Gloo's fail by themselves)."""
        if self.shm is not None:
            self.shm.abort()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place: every rank gets the same sum, added in rank order whatever the
        tensor's size. (Two ranks' sum has one order; past two a ring all-reduce would add an element's parts
        from a rank that depends on where the element falls, so on the batch: the ranks' parts are gathered and
        added here instead, which keeps a row's result independent of the rows beside it.)"""
        if self.shm is not None and self.shm.fits(tensor):
            return self.shm.all_reduce(tensor)
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
        if self.shm is not None and self.shm.fits(tensor):
            return self.shm.gather_columns(tensor, columns)
        if self.rank != 0:
            self.pg.gather([], [tensor], dist.GatherOptions()).wait()
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self.pg.gather([parts], [tensor], dist.GatherOptions()).wait()
        return torch.cat(parts, dim=-1)[..., :columns]
