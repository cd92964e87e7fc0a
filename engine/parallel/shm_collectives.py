"""The collectives of tensor-parallel ranks on one host through shared memory: each rank copies its part into its
slot of a file every rank maps, says so in its counter, waits for every counter, and reads the parts it needs.
Measured on 2 cores, a Gloo all-reduce of a decode step's 16 KB over 127.0.0.1 took about 0.8 ms (docs/BENCHMARKS.md).

Layout: a header of one cache line per rank (its counter: the last call whose part it wrote) and one for the abort
flag, then two banks of `size` slots of `slot_bytes`. Call n uses bank n % 2, so a rank writes call n + 2's part
into the slot of call n only after it waited in call n + 1, by which time every rank has read call n's parts (each
reads them before it publishes n + 1). Every rank waits in every call, gathers included, which that rests on.
Every rank adds the parts in rank order, so all get the same bits, and a row's sum does not depend on the rows
beside it. A tensor larger than a slot is left to the caller (Gloo): every rank decides alike, from shapes that
are the same on every rank."""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import numpy as np
import torch

from engine.errors import EngineDeadError
from engine.kernels import shm_sync_kernel

SLOT_BYTES = 4 << 20  # a decode step's hidden states fit many times over; a long prefill chunk's go through Gloo
_LINE = 64  # bytes: one counter per cache line
_INT64 = 8
_WHY = {1: "the group was aborted (a rank is gone)", 2: "a peer process is gone", 3: "timed out waiting for a peer"}


def create_file(size: int, slot_bytes: int = SLOT_BYTES) -> str:
    """Rank 0: a file of the layout's size, zeroed, in /dev/shm where there is one; its path."""
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="tandem-tp-", dir=directory)
    try:
        os.posix_fallocate(fd, 0, _header_bytes(size) + 2 * size * slot_bytes)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


def _header_bytes(size: int) -> int:
    return _LINE * (size + 1)


class ShmCollectives:
    def __init__(self, path: str, rank: int, size: int, timeout_s: float, child_pids: tuple[int, ...] = (),
                 parent_pid: int = 0) -> None:
        """A wait ends with EngineDeadError when one of `child_pids` has exited and been reaped (rank 0: the other
        ranks), or this process's parent is no longer `parent_pid` (the other ranks: rank 0; 0: not watched)."""
        lib = shm_sync_kernel()
        if lib is None:
            raise OSError("the shared-memory counters need the C kernels")
        self._lib = lib
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.slot_bytes = (len(self._map) - _header_bytes(size)) // (2 * size)  # (as rank 0 made the file)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._header = _header_bytes(size)
        self._pids = (ctypes.c_int32 * max(len(child_pids), 1))(*child_pids)
        self._num_pids, self._parent = len(child_pids), parent_pid
        self._calls = 0

    def _counter(self, rank: int) -> int:
        return self._base + _LINE * rank

    @property
    def _abort_flag(self) -> int:
        return self._base + _LINE * self.size

    def abort(self) -> None:
        """End every rank's wait, now and later (a rank is gone)."""
        self._lib.shm_set(self._abort_flag, 1)

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() <= self.slot_bytes

    def _slot(self, call: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = self._header + ((call % 2) * self.size + rank) * self.slot_bytes
        nbytes = like.numel() * like.element_size()
        return self._bytes[start:start + nbytes].view(like.dtype).view(like.shape)

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Put this rank's part of the next call in place and wait for everyone's: the parts, in rank order."""
        self._calls += 1
        call = self._calls
        self._slot(call, self.rank, tensor).copy_(tensor)
        self._lib.shm_publish(self._counter(self.rank), call)
        code = self._lib.shm_wait(self._base, _LINE // _INT64, self.size, call, self._abort_flag, self._pids,
                                  self._num_pids, self._parent, self.timeout_s)
        if code != 0:
            raise EngineDeadError(f"tensor-parallel rank {self.rank}: {_WHY.get(code, code)}")
        return [self._slot(call, r, tensor) for r in range(self.size)]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (contiguous) over the ranks, in place, added in rank order on every rank."""
        parts = self._exchange(tensor)
        torch.add(parts[0], parts[1], out=tensor)
        for part in parts[2:]:
            tensor += part
        return tensor

    def gather_columns(self, tensor: torch.Tensor, columns: int) -> torch.Tensor:
        """Rank 0: every rank's `tensor` side by side along the last dim, cut to `columns`; other ranks: `tensor`."""
        parts = self._exchange(tensor)
        if self.rank != 0:
            return tensor
        return torch.cat(parts, dim=-1)[..., :columns]

    def counters(self) -> list[int]:
        """Each rank's last call (tests)."""
        flags = np.frombuffer(self._map, dtype=np.int64, count=self.size * _LINE // _INT64)
        return [int(flags[r * _LINE // _INT64]) for r in range(self.size)]
