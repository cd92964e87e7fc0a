"""Copy many byte ranges between two flat uint8 tensors, in parallel, without holding the GIL."""

from __future__ import annotations

import numpy as np
import torch

from engine.kernels import copy_ranges_kernel

_FEW_RANGES = 4


def copy_ranges(dst: torch.Tensor, dst_offsets: np.ndarray, src: torch.Tensor, src_offsets: np.ndarray,
                lengths: np.ndarray) -> None:
    """dst[dst_offsets[i]:+lengths[i]] = src[src_offsets[i]:+lengths[i]] for every i (CPU tensors).

    Callers have checked every range lies inside both tensors; destination ranges must not overlap.
    """
    n = len(lengths)
    if n == 0:
        return
    lib = copy_ranges_kernel()
    # torch splits one large copy over its threads with less start-up cost than the kernel's
    # OpenMP team; the kernel wins once there are many ranges (one torch call each otherwise).
    if lib is not None and n > _FEW_RANGES and not dst.is_cuda and not src.is_cuda:
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (dst_offsets, src_offsets, lengths)]
        lib.copy_ranges(dst.data_ptr(), src.data_ptr(), arrays[0].ctypes.data, arrays[1].ctypes.data,
                        arrays[2].ctypes.data, n, torch.get_num_threads())
        return
    for d, s, k in zip(dst_offsets.tolist(), src_offsets.tolist(), lengths.tolist(), strict=True):
        dst[d:d + k].copy_(src[s:s + k], non_blocking=dst.is_cuda or src.is_cuda)
