"""Paged attention on CPU in C (engine/kernels/paged_attention.c), fp32 or bf16.

One kernel call per layer covers every token of the step, prefill chunks and decodes alike: it
stores the new tokens' K/V in their slots, then attends with K/V read in place from the pool (no
gather, no SDPA fallback). The runner cuts the step's queries into items once per step
(`CpuAttentionPlan`); every layer reuses them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, AttentionShape
from engine.kernels import attention_kernel
from engine.kv_cache import KVCachePool

MAX_ITEM_QUERIES = 16  # MAX_TILE of the kernel: consecutive queries of one sequence per work item
_DT = {torch.float32: 0, torch.bfloat16: 1}


def cpu_attention_supported(pool: KVCachePool, head_dim: int, num_heads: int) -> bool:
    """The C kernel applies: a CPU pool, fp32/bf16 compute and cache, shapes within its limits."""
    return (pool.tensor.device.type == "cpu" and pool.compute_dtype in _DT and pool.spec.dtype in _DT
            and head_dim % 8 == 0 and head_dim <= 256 and num_heads <= 128 and pool.spec.block_size <= 64
            and attention_kernel() is not None)


@dataclass(frozen=True)
class CpuAttentionPlan:
    """Per step: each sequence's block table row, and the work items (runs of <= MAX_ITEM_QUERIES
    consecutive query tokens of one sequence: its table row, first token, count, first position)."""

    tables: torch.Tensor  # [S, width] int64, padded with block 0 (never read past a context)
    item_seq: torch.Tensor  # [I] int32
    item_token: torch.Tensor  # [I] int32
    item_count: torch.Tensor  # [I] int32
    item_pos0: torch.Tensor  # [I] int64

    @staticmethod
    def build(spans: list[tuple[list[int], int, int]]) -> CpuAttentionPlan:
        """`spans`: per scheduled sequence, in token order: (its block ids up to its context after
        the step, first position fed, number of tokens fed)."""
        width = max(len(blocks) for blocks, _, _ in spans)
        tables = [blocks + [0] * (width - len(blocks)) for blocks, _, _ in spans]
        seq, token, count, pos0 = [], [], [], []
        first_token = 0
        for s, (_, start, num_tokens) in enumerate(spans):
            for offset in range(0, num_tokens, MAX_ITEM_QUERIES):
                seq.append(s)
                token.append(first_token + offset)
                count.append(min(MAX_ITEM_QUERIES, num_tokens - offset))
                pos0.append(start + offset)
            first_token += num_tokens
        i32 = torch.int32
        return CpuAttentionPlan(torch.tensor(tables, dtype=torch.int64), torch.tensor(seq, dtype=i32),
                                torch.tensor(token, dtype=i32), torch.tensor(count, dtype=i32),
                                torch.tensor(pos0, dtype=torch.int64))


class CpuAttention:
    def __init__(self, pool: KVCachePool, shape: AttentionShape, metadata: AttentionMetadata) -> None:
        assert metadata.cpu is not None, "the runner plans CPU attention once per step"
        self.pool, self.meta, self.plan, self.shape = pool, metadata, metadata.cpu, shape
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        lib = attention_kernel()
        assert lib is not None, "cpu_attention_supported was checked"
        self.lib: ctypes.CDLL = lib

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qkv, row_stride = self._packed(q, k, v)
        tokens = qkv.shape[0]
        out = q.new_empty((tokens, self.num_heads * self.head_dim))
        plan, pool = self.plan, self.pool
        cache = pool.tensor[layer]
        status = self.lib.paged_attention(
            qkv.data_ptr(), row_stride, _DT[qkv.dtype], tokens, self.meta.slot_mapping.data_ptr(), cache.data_ptr(),
            _DT[cache.dtype], plan.tables.data_ptr(), plan.tables.shape[1], plan.item_seq.data_ptr(),
            plan.item_token.data_ptr(), plan.item_count.data_ptr(), plan.item_pos0.data_ptr(), plan.item_seq.numel(),
            out.data_ptr(), self.num_heads, self.num_kv_heads, self.head_dim, pool.spec.block_size, self.shape.scale,
            self.shape.window(layer), self.shape.softcap, torch.get_num_threads())
        if status != 0:
            raise RuntimeError("the CPU attention kernel refused its inputs (cpu_attention_supported disagrees)")
        return out

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The rows [q | k | v] the kernel reads: the projection's own buffer when q, k and v are
        adjacent views of it (the usual case), else a packed copy."""
        item = q.element_size()
        q_width, kv_width = q.shape[-1], k.shape[-1]
        adjacent = (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.stride(0) == k.stride(0) == v.stride(0)
                    and k.data_ptr() == q.data_ptr() + q_width * item
                    and v.data_ptr() == k.data_ptr() + kv_width * item and q.dtype == k.dtype == v.dtype)
        if adjacent:
            base = q.as_strided((q.shape[0], q_width + 2 * kv_width), (q.stride(0), 1))
            return base, q.stride(0)
        packed = torch.cat((q, k, v), dim=-1).contiguous()
        return packed, packed.stride(0)
