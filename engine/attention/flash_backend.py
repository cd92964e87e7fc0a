"""FlashAttention (vllm-flash-attn, paged varlen) for CUDA in fp16/bf16.

One kernel call per layer covers every sequence of the step, decodes and prefill chunks alike:
queries are packed by `cu_seqlens_q`, keys/values are read straight from the paged pool through
the block table (no gather), `seqused_k` gives each sequence's context length. Sliding windows and
score soft-capping are the kernel's own (`window_size`, `softcap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, AttentionShape
from engine.kv_cache import KVCachePool


def flash_attention_supported(pool: KVCachePool) -> bool:
    """Flash kernels need CUDA, a 16-bit cache in the compute dtype and blocks of a multiple of 16."""
    return (pool.tensor.is_cuda and pool.spec.dtype in (torch.float16, torch.bfloat16)
            and pool.spec.dtype == pool.compute_dtype and pool.spec.block_size % 16 == 0)


@dataclass(frozen=True)
class FlashMetadata:
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    seqused_k: torch.Tensor  # [S] int32
    block_table: torch.Tensor  # [S, max_blocks] int32
    max_seqlen_q: int
    max_seqlen_k: int

    @staticmethod
    def from_attention(meta: AttentionMetadata) -> FlashMetadata:
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[torch.Tensor] = []
        if meta.decode is not None:
            q_lens += [1] * meta.decode.num_seqs
            ctx_lens += meta.decode.context_lens.tolist()
            tables += list(meta.decode.block_tables)
        for seg in meta.segments:
            q_lens.append(seg.num_tokens)
            ctx_lens.append(seg.context_len)
            tables.append(seg.block_ids)
        width = max(len(t) for t in tables)
        device = meta.slot_mapping.device
        table = torch.zeros(len(tables), width, dtype=torch.int32, device=device)
        for row, ids in zip(table, tables, strict=True):
            row[: len(ids)] = ids
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return FlashMetadata(cu, torch.tensor(ctx_lens, dtype=torch.int32, device=device), table,
                             max(q_lens), max(ctx_lens))


class FlashAttention:
    def __init__(self, pool: KVCachePool, shape: AttentionShape, metadata: AttentionMetadata,
                 flash: FlashMetadata | None = None) -> None:
        from vllm_flash_attn import flash_attn_varlen_func

        self._kernel = flash_attn_varlen_func
        self.pool = pool
        self.shape = shape
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.meta = metadata
        self.flash = flash or FlashMetadata.from_attention(metadata)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.pool.write(layer, self.meta.slot_mapping, k, v)
        cache = self.pool.tensor[layer]  # [num_blocks, block_size, 2, kv_heads, head_dim]
        f = self.flash
        window = self.shape.window(layer)  # flash counts the keys left of the query's own
        out = self._kernel(
            q=q.view(-1, self.num_heads, self.head_dim), k=cache[:, :, 0], v=cache[:, :, 1],
            cu_seqlens_q=f.cu_seqlens_q, max_seqlen_q=f.max_seqlen_q, seqused_k=f.seqused_k,
            max_seqlen_k=f.max_seqlen_k, softmax_scale=self.shape.scale, causal=True, block_table=f.block_table,
            window_size=(window - 1, 0) if window > 0 else (-1, -1), softcap=self.shape.softcap)
        return out.reshape(-1, self.num_heads * self.head_dim)
