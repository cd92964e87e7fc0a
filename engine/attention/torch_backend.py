"""Paged attention in plain torch, for CPU and CUDA: the reference the C kernel (cpu_backend.py) is
tested against, and the path wherever no faster backend applies (fp16/fp8 caches, CUDA without
flash, TANDEM_DISABLE_C_KERNELS=1).

Decode: one gather of each sequence's blocks, then grouped-query matmuls per KV head over
strided views (queries of a KV head's group share one K/V read; K/V are never repeated).
Multi-token segments: scaled_dot_product_attention with GQA and a causal mask offset by the
number of cached tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, DecodeBatch, Segment
from engine.kv_cache import KVCachePool


class TorchAttention:
    def __init__(self, pool: KVCachePool, num_heads: int, num_kv_heads: int, head_dim: int,
                 metadata: AttentionMetadata) -> None:
        self.pool = pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5
        self.meta = metadata

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.pool.write(layer, meta.slot_mapping, k, v)
        q = q.view(-1, self.num_heads, self.head_dim)
        out = torch.empty_like(q)
        if meta.decode is not None:
            n = meta.decode.num_seqs
            out[:n] = self._decode(layer, q[:n], meta.decode)
        for seg in meta.segments:
            span = slice(seg.token_start, seg.token_start + seg.num_tokens)
            out[span] = self._segment(layer, q[span], k[span], v[span], seg)
        return out.view(-1, self.num_heads * self.head_dim)

    def _decode(self, layer: int, q: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        bsz = batch.num_seqs
        kv = self.pool.gather(layer, batch.block_tables)  # [B, nb, bs, 2, kvh, d]
        kv = kv.view(bsz, -1, 2, self.num_kv_heads, self.head_dim)  # [B, L, 2, kvh, d]
        q = q.view(bsz, self.num_kv_heads, self.group, self.head_dim)
        out = torch.empty_like(q)
        for h in range(self.num_kv_heads):
            keys_t = kv[:, :, 0, h].transpose(1, 2)  # [B, d, L], strided view, no copy
            scores = torch.baddbmm(batch.bias, q[:, h], keys_t, alpha=self.scale)  # [B, g, L]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            torch.bmm(probs, kv[:, :, 1, h], out=out[:, h])
        return out.view(bsz, self.num_heads, self.head_dim)

    def _segment(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 seg: Segment) -> torch.Tensor:
        if seg.causal_mask is None:
            # Nothing cached before these tokens: attend to the fresh K/V directly.
            keys, values = k_new, v_new
        else:
            kv = self.pool.gather(layer, seg.block_ids).view(-1, 2, self.num_kv_heads, self.head_dim)
            keys, values = kv[: seg.context_len, 0], kv[: seg.context_len, 1]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=seg.causal_mask, is_causal=seg.causal_mask is None,
            scale=self.scale, enable_gqa=self.group > 1,
        )
        return out.transpose(0, 1)
