"""Weight-only int8 / int4 weights: quantizing fp32 weights, and GGUF blocks mapped onto them (the
layers that run them: engine/quant_layers.py).

Kernel conventions (torch 2.13, read from aten/src/ATen/native/cpu/int4mm_kernel.cpp and checked
numerically in tests/test_quant.py):

- int8: `torch._weight_int8pack_mm(x [M, K], q int8 [N, K], scale [N])` = x @ (q * scale).T; the
  scale dtype must equal x's; K % 8 != 0 crashes the process (segfault), so it is refused here.
  On an AVX2 CPU it is fast only with bf16 activations.
- int4 (CPU): `_convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15)` → uint8 [N, K / 2] in
  a layout that depends on the CPU's ISA (AVX512 and AVX2 pack differently: pack where you run);
  `_weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros [K / G, N, 2])` computes x @ w.T with
  w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G], scales_and_zeros in x's dtype.
  G ∈ {32, 64, 128, 256}, K % G == 0, N % 16 == 0.
- int4 (CUDA): `_convert_weight_to_int4pack(uint8 [N, K / 2], inner_k_tiles)` with two values per
  byte, even k in the high nibble; `_weight_int4pack_mm` takes bf16 x and the same formula. Not
  exercised on this machine; when it fails the layer dequantizes on the fly instead.

Activations are cast to bf16 for the kernels and the result back to x's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from gguf import GGMLQuantizationType

logger = logging.getLogger(__name__)

QuantMethod = Literal["int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)
_GGUF_BLOCK = 32
KERNEL_DTYPE = torch.bfloat16


class UnsupportedShapeError(ValueError):
    """The kernel cannot take a layer of this shape; the caller keeps that layer in float."""


def check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise UnsupportedShapeError(f"in_features {in_features} is not a multiple of group {group_size}")
    if out_features % 16:
        raise UnsupportedShapeError(f"out_features {out_features} is not a multiple of 16")


@dataclass(frozen=True, eq=False)
class Int4Weights:
    """Grouped asymmetric int4: w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G].

    q: uint8 [N, K] holding 0..15 (unpacked); scale, zero: float32 [N, K // G].
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        if self.q.dtype != torch.uint8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-D uint8 tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        n, k = self.q.shape
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {self.group_size}")
        groups = (n, k // self.group_size)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or tuple(t.shape) != groups:
                raise ValueError(f"{name} must be float32 {groups}, got {t.dtype} {tuple(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight these values stand for."""
        n, k = self.shape
        q = self.q.to(torch.float32).view(n, -1, self.group_size) - 8.0
        return (q * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> Int4Weights:
        """Apply a row permutation `fn` (on [rows, ...] arrays) to q, scale and zero alike.

        For GGUF llama q/k: `w.map_rows(lambda a: unpermute_qk_rows(a, num_heads))`.
        """
        q, scale, zero = (torch.from_numpy(fn(t.cpu().numpy())) for t in (self.q, self.scale, self.zero))
        return Int4Weights(q, scale, zero, self.group_size)

    @staticmethod
    def concat(parts: Sequence[Int4Weights]) -> Int4Weights:
        """Stack along rows (e.g. q, k, v → qkv_proj); all parts share in_features and group size."""
        if not parts or len({(p.shape[1], p.group_size) for p in parts}) != 1:
            raise ValueError("concat needs at least one part, all with equal in_features and group_size")
        q, scale, zero = (torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero"))
        return Int4Weights(q, scale, zero, parts[0].group_size)


@dataclass(frozen=True, eq=False)
class Int8Weights:
    """Symmetric per-row int8: w[n, k] = q[n, k] * scale[n]. q: int8 [N, K]; scale: float32 [N]."""

    q: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise ValueError(f"q must be a 2-D int8 tensor, got {self.q.dtype} {tuple(self.q.shape)}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (self.q.shape[0],):
            raise ValueError(f"scale must be float32 [{self.q.shape[0]}], got {tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def dequantize(self) -> torch.Tensor:
        return self.q.to(torch.float32) * self.scale[:, None]

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> Int8Weights:
        """Apply a row permutation `fn` (on [rows, ...] arrays) to q and scale alike."""
        return Int8Weights(*(torch.from_numpy(fn(t.cpu().numpy())) for t in (self.q, self.scale)))

    @staticmethod
    def concat(parts: Sequence[Int8Weights]) -> Int8Weights:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("concat needs at least one part, all with equal in_features")
        return Int8Weights(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


QuantizedWeights = Int4Weights | Int8Weights


def quantize_int8(weight: torch.Tensor) -> Int8Weights:
    """Per-row symmetric int8 of a float [N, K] weight: scale = max|w| / 127, rounded to bf16
    (the kernel's scale dtype) before q is chosen, so `dequantize()` is what the kernel computes."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-30).to(KERNEL_DTYPE).to(torch.float32)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weights(q, scale)


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Int4Weights:
    """Grouped min/max int4 of a float [N, K] weight.

    scale and zero are rounded to bf16 before q is chosen, so `dequantize()` is exactly what the
    bf16 kernel computes with.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    n, k = weight.shape
    if k % group_size:
        raise UnsupportedShapeError(f"in_features {k} is not a multiple of group {group_size}")
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(KERNEL_DTYPE).to(torch.float32)
    zero = (lo + 8.0 * scale).to(KERNEL_DTYPE).to(torch.float32)
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15)
    return Int4Weights(q.to(torch.uint8).reshape(n, k), scale, zero, group_size)


def _gguf_blocks(raw: np.ndarray, shape: tuple[int, int], block_bytes: int) -> np.ndarray:
    rows, cols = shape
    if cols % _GGUF_BLOCK:
        raise ValueError(f"GGUF row length {cols} is not a multiple of {_GGUF_BLOCK}")
    expected = rows * (cols // _GGUF_BLOCK) * block_bytes
    if raw.dtype != np.uint8 or raw.size != expected:
        raise ValueError(f"expected {expected} uint8 bytes for shape {shape}, got {raw.size} {raw.dtype}")
    return np.ascontiguousarray(raw).reshape(rows, cols // _GGUF_BLOCK, block_bytes)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def int4_from_gguf(raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> Int4Weights:
    """Q4_0 / Q4_1 blocks (`GGUFReader(...).tensors[i].data`, uint8) as group-32 Int4Weights.

    `shape` is (rows, cols) = (out_features, in_features). A block of 32 is d (f16)[, m (f16)],
    then 16 bytes: low nibbles are elements 0..15, high nibbles 16..31. Q4_0: w = d * (q - 8) →
    scale = d, zero = 0. Q4_1: w = d * q + m → scale = d, zero = m + 8d. The values are exact; only
    the kernel's bf16 scale/zero round them. Rows are in file order: llama q/k need `map_rows`.
    """
    if ggml_type == GGMLQuantizationType.Q4_0:
        header = 2
    elif ggml_type == GGMLQuantizationType.Q4_1:
        header = 4
    else:
        raise ValueError(f"int4_from_gguf takes Q4_0 or Q4_1 blocks, got ggml type {ggml_type}")
    blocks = _gguf_blocks(raw, shape, header + _GGUF_BLOCK // 2)
    d = _f16_field(blocks, 0)
    packed = blocks[..., header:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(shape)
    zero = np.zeros_like(d) if header == 2 else _f16_field(blocks, 2) + 8.0 * d
    return Int4Weights(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero), _GGUF_BLOCK)


def int8_from_gguf_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> Int8Weights:
    """Q8_0 blocks (d f16, 32 x int8) as per-row Int8Weights.

    Q8_0 has one scale per 32 values and the int8 kernel one per row, so the blocks are
    dequantized and requantized per row: each value moves by at most half the row's new scale.
    """
    blocks = _gguf_blocks(raw, shape, 2 + _GGUF_BLOCK)
    values = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32)
    return quantize_int8(torch.from_numpy((values * _f16_field(blocks, 0)[..., None]).reshape(shape)))
