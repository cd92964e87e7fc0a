"""The batch-1 decode floor: the weight bytes a decode step reads, over this machine's copy
bandwidth measured in the same run (a torch copy between two 256 MiB buffers)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BandwidthFloor:
    copy_gb_s: float  # GB/s copied (bytes read = bytes written)
    weight_bytes: int  # bytes of every weight a one-token step reads (the embedding: one row)
    floor_ms: float  # weight_bytes / copy bandwidth


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best of `repeats` copies, in GB/s."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors a one-token decode step reads: every weight as the engine keeps it (a
    packed linear's one-row copy instead of its packed weight, where it has one), one embedding row;
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
        if own.get("weight_t") is not None:
            own.pop("packed", None)
        total += sum(t.numel() * t.element_size() for t in own.values() if t is not None)
    return total


def batch1_floor(model: torch.nn.Module) -> BandwidthFloor:
    gb_s = copy_bandwidth()
    weight_bytes = step_weight_bytes(model)
    return BandwidthFloor(gb_s, weight_bytes, 1e3 * weight_bytes / (gb_s * 1e9))
