"""One OpenMP team per process: the engine thread's.

libgomp spins its idle team threads for a fast wake-up only while it manages no more threads than there are
CPUs. Every thread that has run a parallel region keeps its own team, so once the thread that loaded the model
(which runs parallel regions while packing and warming up) holds a team, the engine thread's team makes one
too many on a small machine and every parallel region pays a futex wake instead: measured on 2 cores, a
decode step on a non-main thread took 1.8-2.4x as long as on the main thread, and as long again once the
main thread's team was given back (docs/BENCHMARKS.md).

`hand_over` gives the calling thread's team back and keeps that thread single-threaded in OpenMP (so a large
torch op there cannot build a new team) until `take_back`; `release_team` gives a team back after occasional
work on a helper thread. Without libgomp (another OpenMP runtime, or none) they do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what can be rebuilt


@functools.cache
def _libgomp() -> tuple[ctypes.CDLL, ...]:
    """Every libgomp loaded in this process (torch's bundled one, and the system's if another module
    loaded it): opened by path, so the loaded instances themselves, never a fresh one."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "/libgomp" in line})
    libs = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            lib.omp_get_max_threads.restype = ctypes.c_int
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            libs.append(lib)
        except (OSError, AttributeError) as exc:  # an old libgomp without OpenMP 5 pause: leave it be
            log.debug("libgomp at %s not used: %s", path, exc)
    return tuple(libs)


@dataclass(frozen=True)
class HandedOver:
    """What `take_back` restores: the thread and its OpenMP thread counts, per libgomp."""

    thread_id: int
    num_threads: tuple[int, ...]


def release_team() -> None:
    """Free the calling thread's OpenMP team (its next parallel region builds one again)."""
    for lib in _libgomp():
        if lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) != 0:
            log.debug("omp_pause_resource_all refused: this thread is inside a parallel region")


def hand_over() -> HandedOver:
    """Free the calling thread's OpenMP team and run its later parallel regions on one thread."""
    libs = _libgomp()
    counts = tuple(lib.omp_get_max_threads() for lib in libs)
    release_team()
    for lib in libs:
        lib.omp_set_num_threads(1)
    return HandedOver(threading.get_ident(), counts)


def take_back(handed: HandedOver) -> None:
    """Restore the thread counts `hand_over` took, when called on the same thread (the counts are per thread)."""
    if threading.get_ident() != handed.thread_id:
        return
    for lib, count in zip(_libgomp(), handed.num_threads, strict=False):
        lib.omp_set_num_threads(count)
