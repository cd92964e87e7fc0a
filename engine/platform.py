"""Facts about the machine, measured once at start-up (kept apart from configuration)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch


@dataclass(frozen=True)
class Platform:
    device: torch.device
    # bf16 matmuls run natively (AVX512-BF16/AMX on CPU, any CUDA GPU). On AVX2-only CPUs bf16 is
    # emulated and ~10x slower than fp32, so the compute dtype falls back to fp32 there.
    fast_bf16: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.fast_bf16 else torch.float32


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def detect_platform(device: Literal["auto", "cpu", "cuda"] = "auto") -> Platform:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available; use 'cpu' or 'auto'")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        return Platform(
            device=torch.device("cuda", torch.cuda.current_device()),
            fast_bf16=torch.cuda.is_bf16_supported(),
        )
    flags = _cpu_flags()
    return Platform(
        device=torch.device("cpu"),
        fast_bf16=bool({"avx512_bf16", "amx_bf16"} & flags),
    )
