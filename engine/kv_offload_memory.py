"""Where the second KV tier's bytes live: a memory-mapped file on local disk (CPU pool) or pinned host memory
(GPU pool)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


def mapped_file(directory: str | None, num_bytes: int) -> torch.Tensor:
    """A file of `num_bytes` mapped shared, unlinked at once so that nothing outlives the process. Its space is
    allocated now (OSError here if the disk is too small): a write into a mapped page of a full file system
    would kill the process with SIGBUS later."""
    fd, path = tempfile.mkstemp(prefix="tandem-kv-offload-", dir=directory)
    try:
        os.posix_fallocate(fd, 0, num_bytes)
        os.close(fd)
        mapped = np.memmap(path, dtype=np.uint8, mode="r+", shape=(num_bytes,))
    finally:
        os.unlink(path)
    return torch.from_numpy(mapped)  # the tensor keeps the mapping alive


_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every device, not only the current one


def pinned_host(num_bytes: int) -> torch.Tensor:
    """Page-locked host memory of exactly `num_bytes` (torch's pinned allocator rounds up to a power of two);
    `unpin` it before it is freed."""
    flat = torch.empty(num_bytes, dtype=torch.uint8)
    error = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), num_bytes, _CUDA_HOST_REGISTER_PORTABLE)
    if int(error) != 0:
        raise RuntimeError(f"could not pin {num_bytes} bytes of host memory for the KV offload tier (CUDA error "
                           f"{int(error)}): lower --kv-offload-gib or raise the locked-memory limit (ulimit -l)")
    return flat


def unpin(flat: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())
