"""The paged KV cache: one preallocated pool of fixed-size blocks shared by every sequence.

Layout: `[num_layers, num_blocks, block_size, 2 (k, v), num_kv_heads, head_dim]`.
Invariants the rest of Tandem relies on:
- one block of one layer (all its tokens, K and V, all heads) is one contiguous byte range, and
  consecutive block ids are adjacent, so a run of blocks is a single descriptor for kv_transfer;
- a slot is `block_id * block_size + offset`; slot s of layer l holds the K/V of exactly one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import KVCacheDtype

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "fp8_e4m3": torch.float8_e4m3fn,
}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn value; K/V are clamped into range before the cast


def resolve_kv_dtype(kv_dtype: KVCacheDtype, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if kv_dtype == "auto" else _STORAGE_DTYPES[kv_dtype]


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"KV cache needs >= 1 block of >= 1 token, got {self.num_blocks}x{self.block_size}")

    @property
    def bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers."""
        return self.num_layers * self.block_size * self.bytes_per_token_per_layer

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_blocks, self.block_size, 2, self.num_kv_heads, self.head_dim)


def tensor_bytes(spec: KVCacheSpec) -> int:
    """Bytes of the pool tensor: `spec.num_blocks` blocks plus the scratch block."""
    return (spec.num_blocks + 1) * spec.bytes_per_block


class KVCachePool:
    """Owns the KV tensor; writes new tokens' K/V into slots and gathers blocks for attention.

    The tensor holds one block more than `spec.num_blocks`: block `scratch_block` (the last) is never
    handed out; padded rows of captured CUDA graphs write into it.
    """

    def __init__(self, spec: KVCacheSpec, device: torch.device, compute_dtype: torch.dtype,
                 storage: torch.Tensor | None = None) -> None:
        """`storage`, when given, is a flat uint8 tensor of exactly `tensor_bytes(spec)` on `device`
        that the pool lives in (e.g. host memory other processes can map); it is zeroed."""
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.is_fp8 = spec.dtype == torch.float8_e4m3fn
        shape = list(spec.shape)
        shape[1] += 1
        if storage is None:
            self.tensor = torch.zeros(shape, dtype=spec.dtype, device=device)
        else:
            wrong_device = storage.device.type != device.type
            if storage.dtype != torch.uint8 or storage.numel() != tensor_bytes(spec) or wrong_device:
                raise ValueError(f"KV storage must be {tensor_bytes(spec)} uint8 bytes on {device}")
            self.tensor = storage.zero_().view(spec.dtype).view(shape)
        self.scratch_block = spec.num_blocks
        self.scratch_slot = spec.num_blocks * spec.block_size
        # CPU kernels do not index fp8 tensors: move fp8 values as their bytes.
        stored = self.tensor.view(torch.uint8) if self.is_fp8 else self.tensor
        # Per layer, one row per block: the unit of gathering and of transfer.
        self._rows = stored.view(spec.num_layers, spec.num_blocks + 1, -1)
        self._slots = stored.view(spec.num_layers, (spec.num_blocks + 1) * spec.block_size,
                                  2, spec.num_kv_heads, spec.head_dim)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V `[T, kv_heads, head_dim]` of T tokens into their slots."""
        kv = torch.stack((k, v), dim=1)
        if self.is_fp8:
            kv = kv.clamp(-_FP8_MAX, _FP8_MAX).to(self.spec.dtype).view(torch.uint8)
        self._slots[layer].index_copy_(0, slot_mapping, kv.to(self._slots.dtype))

    def gather(self, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Blocks `block_ids` (any shape S) of one layer as `[*S, block_size, 2, kv_heads, head_dim]`
        in the compute dtype."""
        rows = self._rows[layer].index_select(0, block_ids.reshape(-1))
        if self.is_fp8:
            rows = rows.view(self.spec.dtype)
        if rows.dtype != self.compute_dtype:
            rows = rows.to(self.compute_dtype)
        return rows.view(*block_ids.shape, self.spec.block_size, 2, self.spec.num_kv_heads, self.spec.head_dim)

    def byte_rows(self) -> torch.Tensor:
        """The pool as bytes, `[layers, blocks + 1, bytes of one block of one layer]` (a view: copies of whole
        blocks, whatever the dtype)."""
        return self.tensor.view(torch.uint8).view(self.spec.num_layers, self.spec.num_blocks + 1, -1)

    def block_bytes(self, layer: int, block_id: int) -> torch.Tensor:
        """Raw bytes of one block of one layer (a view, for transfer and tests)."""
        return self._rows[layer, block_id].view(torch.uint8)
