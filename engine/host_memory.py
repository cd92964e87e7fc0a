"""The C heap of a serving process: freed activation buffers stay mapped for the next step.

glibc's malloc serves blocks above its mmap threshold (128 KiB at first, raised as such blocks are freed)
with fresh mappings, and returns the heap's free top to the kernel past its trim threshold. A step's
activations are tens of MiB in a prefill, so each step faulted in and zeroed its buffers anew: measured on
2 cores (8 x 512-token prefill, default model, bf16), 1.27-1.38 s a run and erratic, against 1.07-1.11 s
with the threshold fixed at its maximum and no trimming (docs/BENCHMARKS.md). The cost: the process keeps
its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest on 64-bit: bigger blocks are mapped whatever is asked
TOP_PAD_BYTES = 64 << 20  # heap grown in steps of this much beyond a request
NEVER_TRIM_BYTES = (1 << 31) - 1


@functools.cache
def keep_freed_buffers() -> bool:
    """Set glibc's malloc to reuse freed large blocks instead of unmapping them (once per process);
    False where the C library is not glibc or refuses."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, NEVER_TRIM_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES)))
    if not done:
        log.info("malloc tuning refused by this C library: activation buffers may be mapped anew each step")
    return done
