"""The batch-1 decode floor: the weight bytes a decode step reads, over this machine's read
bandwidth measured in the same run (a torch sum over a 256 MiB buffer, all threads).

A copy moves each byte twice (read and write) and runs at about half the read rate, so a floor on
copy bandwidth would be twice too lenient; the copy rate is reported beside it for reference."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BandwidthFloor:
    read_gb_s: float  # GB/s read (a reduction: nothing written back)
    copy_gb_s: float  # GB/s copied, each byte counted once (read once and written once)
    weight_bytes: int  # bytes of every weight a one-token step reads (the embedding: one row)
    floor_ms: float  # weight_bytes / read bandwidth


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best of `repeats` sums over an fp32 buffer of `nbytes`, in GB/s read."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best_seconds(src.sum, repeats) / 1e9


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best of `repeats` copies, in GB/s copied."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return nbytes / _best_seconds(lambda: dst.copy_(src), repeats) / 1e9


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a one-token decode step reads: every weight as the engine keeps it (a
    packed linear's one-row weight instead of its packed weights, where it has one), one embedding row;
    not the rotary tables (a step reads one row of them)."""
    from engine.models.rope import RotaryEmbedding

    total = 0
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            continue
        if isinstance(module, torch.nn.Embedding):
            total += module.weight[0].numel() * module.weight.element_size()
            continue
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        if own.get("one_row") is not None:  # its packed weights (packed; packed_gate, packed_up) stay unread
            own = {name: t for name, t in own.items() if not name.startswith("packed")}
        total += sum(t.numel() * t.element_size() for t in own.values() if t is not None)
    return total


def batch1_floor(model: torch.nn.Module) -> BandwidthFloor:
    read = read_bandwidth()
    weight_bytes = step_weight_bytes(model)
    return BandwidthFloor(read, copy_bandwidth(), weight_bytes, 1e3 * weight_bytes / (read * 1e9))
