"""The checksum a KV store and its readers and writers agree on for a block's bytes: CRC-32 (zlib's, which
releases the GIL on large buffers). It catches a torn or truncated copy and a stray write, not an attacker."""

from __future__ import annotations

import zlib

import torch


def block_checksum(data: torch.Tensor) -> int:
    """CRC-32 of a contiguous CPU uint8 tensor's bytes."""
    if data.dtype != torch.uint8 or data.is_cuda or not data.is_contiguous():
        raise ValueError("a checksum is taken over a contiguous CPU uint8 tensor")
    return zlib.crc32(data.numpy().data)
