"""Weight-only int8 / int4 linear layers, their weights, and GGUF blocks mapped onto them.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

logger = logging.getLogger(__name__)

QuantMethod = Literal["int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)
_GGUF_BLOCK = 32
_KERNEL_DTYPE = torch.bfloat16


class UnsupportedShapeError(ValueError):
    """The kernel cannot take a layer of this shape; the caller keeps that layer in float."""


def _check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
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
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-30).to(_KERNEL_DTYPE).to(torch.float32)
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
    scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(_KERNEL_DTYPE).to(torch.float32)
    zero = (lo + 8.0 * scale).to(_KERNEL_DTYPE).to(torch.float32)
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


def _flatten(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected input with last dimension {in_features}, got {tuple(x.shape)}")
    return x.reshape(-1, in_features).to(_KERNEL_DTYPE).contiguous()


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, through `_weight_int8pack_mm` on CPU.

    On CUDA the weight is widened to x's dtype per call (saves memory, not time).
    """

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weights: Int8Weights, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.shape
        if self.in_features % 8:  # the CPU kernel reads K in steps of 8 and segfaults otherwise
            raise UnsupportedShapeError(f"int8 needs in_features divisible by 8, got {self.in_features}")
        self.register_buffer("q", weights.q.contiguous())
        self.register_buffer("scale", weights.scale.to(_KERNEL_DTYPE))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(quantize_int8(linear.weight), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            y = F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(_flatten(x, self.in_features), self.q, self.scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ w.T + bias with grouped int4 w (see Int4Weights), packed for the weights' device.

    The packed layout is specific to the device (and CPU ISA) it was packed on: build the layer
    where it will run; moving it afterwards is refused at forward time.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    q: torch.Tensor  # only when the kernel is unavailable (CUDA fallback)

    def __init__(self, weights: Int4Weights, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weights.shape
        self.group_size = weights.group_size
        _check_int4_shape(self.out_features, self.in_features, self.group_size)
        self.packed_on = weights.q.device
        # [K / G, N, 2]: the kernel's scales_and_zeros, bf16.
        sz = torch.stack([weights.scale, weights.zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(_KERNEL_DTYPE), persistent=False)
        self.use_kernel = True
        if self.packed_on.type == "cuda":
            self.use_kernel = self._pack_cuda(weights)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(weights.q.to(torch.int32).contiguous(), 1)
            self.register_buffer("packed", packed, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _pack_cuda(self, weights: Int4Weights) -> bool:
        q = weights.q.contiguous()
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
        try:
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
            packed = torch._convert_weight_to_int4pack(pairs, inner_k_tiles)
            probe = torch.zeros(1, self.in_features, dtype=_KERNEL_DTYPE, device=q.device)
            torch._weight_int4pack_mm(probe, packed, self.group_size, self.scales_and_zeros)
        except RuntimeError as err:  # no tinygemm for this build or GPU: dequantize per call
            logger.debug("int4 CUDA kernel unavailable (%s); dequantizing on the fly", err)
            self.register_buffer("q", q, persistent=False)
            return False
        self.register_buffer("packed", packed, persistent=False)
        return True

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        _check_int4_shape(linear.out_features, linear.in_features, group_size)
        return cls(quantize_int4(linear.weight, group_size), linear.bias)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scale, zero = (t.transpose(0, 1).to(dtype) for t in self.scales_and_zeros.unbind(-1))
        q = self.q.to(dtype).view(self.out_features, -1, self.group_size) - 8
        return (q * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.scales_and_zeros.device or self.scales_and_zeros.device != self.packed_on:
            raise RuntimeError(f"Int4Linear was packed on {self.packed_on}; got input on {x.device}")
        if not self.use_kernel:
            y = F.linear(x, self._dequantized(x.dtype))
        else:
            x2 = _flatten(x, self.in_features)
            if x.device.type == "cuda":
                y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _quantized_layer(linear: nn.Linear, method: QuantMethod, group_size: int,
                     weights: QuantizedWeights | None) -> nn.Module:
    if weights is None and method == "int8":
        return Int8Linear.from_linear(linear)
    if weights is None:
        return Int4Linear.from_linear(linear, group_size)
    if weights.shape != (linear.out_features, linear.in_features):
        raise ValueError(f"prebuilt weights {weights.shape} do not match the layer "
                         f"({linear.out_features}, {linear.in_features})")
    device = linear.weight.device
    if isinstance(weights, Int8Weights):
        return Int8Linear(Int8Weights(weights.q.to(device), weights.scale.to(device)), linear.bias)
    moved = Int4Weights(weights.q.to(device), weights.scale.to(device), weights.zero.to(device),
                        weights.group_size)
    return Int4Linear(moved, linear.bias)


def quantize_model(model: nn.Module, method: QuantMethod, *, group_size: int = 32,
                   skip: Callable[[str], bool] | None = None,
                   prebuilt: Mapping[str, QuantizedWeights] | None = None) -> list[str]:
    """Replace every nn.Linear of `model` (not skipped by name) by a quantized layer, in place.

    A layer takes `prebuilt[name]` when present (its type, Int4 or Int8, decides the layer, so
    Q8_0 and Q4_1 tensors can be mixed), else it is quantized from its float weight with `method`.
    Layers the kernel cannot take stay float. Quantized layers own fresh tensors, so a weight
    shared with an embedding (tied lm_head) is left untouched. Returns the replaced names.
    Run it after the model is on its final device.
    """
    if method not in ("int8", "int4"):
        raise ValueError(f"quantization method must be 'int8' or 'int4', got {method!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    prebuilt = prebuilt or {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(prebuilt) - set(linears))
    if unknown:
        raise ValueError(f"prebuilt weights name no nn.Linear of the model: {unknown}")
    if "" in linears:
        raise ValueError("the model itself is an nn.Linear: wrap it in a module to quantize it")
    replaced: list[str] = []
    for name, linear in linears.items():
        if skip is not None and skip(name):
            continue
        try:
            layer = _quantized_layer(linear, method, group_size, prebuilt.get(name))
        except UnsupportedShapeError as err:
            logger.debug("keeping %s in float: %s", name, err)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        replaced.append(name)
    return replaced
