"""Local segments: registered buffers, and host memory that other processes can map.

`SharedHostBuffer` is a memfd (anonymous, never a file in /dev/shm that could outlive a killed
process). Peers on the same host map it through `/proc/<pid>/fd/<fd>`, and check the inode they
opened is the one published, so a recycled pid can never map someone else's memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass

import torch

from kv_transfer.datatypes import DeviceKind


class SharedHostBuffer:
    """`nbytes` of host memory backed by a memfd; `tensor` is a flat uint8 view of it."""

    def __init__(self, nbytes: int, label: str) -> None:
        if nbytes <= 0:
            raise ValueError(f"a shared buffer needs a positive size, got {nbytes}")
        self.fd = os.memfd_create(f"tandem-{label}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self.nbytes = nbytes
        self._map = mmap.mmap(self.fd, nbytes)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.inode = os.fstat(self.fd).st_ino

    def endpoint(self, view: torch.Tensor) -> dict[str, int | str]:
        """How a same-host peer maps `view` (a tensor inside this buffer)."""
        return {"pid": os.getpid(), "fd": self.fd, "inode": self.inode, "boot_id": boot_id(),
                "size": self.nbytes, "offset": view.data_ptr() - self.tensor.data_ptr()}

    def contains(self, tensor: torch.Tensor) -> bool:
        base = self.tensor.data_ptr()
        start = tensor.data_ptr()
        return base <= start and start + tensor.numel() * tensor.element_size() <= base + self.nbytes

    def close(self) -> None:
        """Drop our mapping and fd; peers' mappings stay valid until they close theirs."""
        del self.tensor
        with contextlib.suppress(BufferError):  # a view is still alive: the mapping goes with it
            self._map.close()
        os.close(self.fd)


def map_peer_buffer(endpoint: dict, length: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map the `length` bytes a peer published from its `SharedHostBuffer`; raises OSError when
    that memory is not reachable from here."""
    if endpoint.get("boot_id") != boot_id():
        raise OSError("the peer's buffer is on another host")
    fd = os.open(f"/proc/{endpoint['pid']}/fd/{endpoint['fd']}", os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != endpoint["inode"]:
            raise OSError("the peer's buffer fd now names another file (peer restarted)")
        mapping = mmap.mmap(fd, endpoint["size"])
    finally:
        os.close(fd)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    return mapping, whole[endpoint["offset"]:endpoint["offset"] + length]


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@dataclass(frozen=True)
class LocalSegment:
    """A registered buffer: `data` is a flat uint8 view of the whole registered tensor."""

    name: str
    data: torch.Tensor
    shared: SharedHostBuffer | None  # set when the memory is mappable by same-host peers
    guarded: bool = False  # two-sided batches need a grant (kv_transfer.grants)

    @property
    def length(self) -> int:
        return self.data.numel()

    @property
    def address(self) -> int:
        return self.data.data_ptr()

    @property
    def device(self) -> DeviceKind:
        return "cuda" if self.data.is_cuda else "cpu"

    @property
    def device_id(self) -> int:
        return (self.data.device.index or 0) if self.data.is_cuda else 0


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, fp8 included)."""
    if not tensor.is_contiguous():
        raise ValueError("only contiguous tensors can be registered as segments")
    return tensor.reshape(-1).view(torch.uint8)
