"""Paged attention in plain torch, for CPU and CUDA: the reference the C kernel (cpu_backend.py) is
tested against, and the path wherever no faster backend applies (fp16/fp8 caches on CPU, CUDA without
Triton, TANDEM_DISABLE_C_KERNELS=1).

Decode: one gather of each sequence's blocks, then grouped-query matmuls per KV head over
strided views (queries of a KV head's group share one K/V read; K/V are never repeated).
Multi-token segments: scaled_dot_product_attention with GQA and a causal mask offset by the
number of cached tokens. A layer with a sliding window masks the keys before its window too; with
score soft-capping (which SDPA cannot do) a segment's attention is spelled out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, AttentionShape, DecodeBatch, Segment
from engine.kv_cache import KVCachePool


class TorchAttention:
    def __init__(self, pool: KVCachePool, shape: AttentionShape, metadata: AttentionMetadata) -> None:
        self.pool = pool
        self.shape = shape
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.group = shape.group
        self.scale = shape.scale
        self.meta = metadata
        self._biases: dict[int, torch.Tensor] = {}  # window → the decode batch's additive mask
        self._masks: dict[tuple[int, int], torch.Tensor | None] = {}  # (segment, window) → its mask

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, window = self.meta, self.shape.window(layer)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.pool.write(layer, meta.slot_mapping, k, v)
        q = q.view(-1, self.num_heads, self.head_dim)
        out = torch.empty_like(q)
        if meta.decode is not None:
            n = meta.decode.num_seqs
            out[:n] = self._decode(layer, q[:n], meta.decode, self._bias(meta.decode, window))
        for i, seg in enumerate(meta.segments):
            span = slice(seg.token_start, seg.token_start + seg.num_tokens)
            out[span] = self._segment(layer, q[span], k[span], v[span], seg, self._mask(i, seg, window))
        return out.view(-1, self.num_heads * self.head_dim)

    def _bias(self, batch: DecodeBatch, window: int) -> torch.Tensor:
        """The decode batch's additive mask: -inf past each context and, with a window, before it."""
        if window == 0:
            return batch.bias
        if window not in self._biases:
            span = torch.arange(batch.bias.shape[-1], device=batch.bias.device)
            early = (span[None, :] <= batch.context_lens[:, None] - 1 - window).unsqueeze(1)
            self._biases[window] = batch.bias.masked_fill(early, float("-inf"))
        return self._biases[window]

    def _mask(self, index: int, seg: Segment, window: int) -> torch.Tensor | None:
        """Which of its context each query sees ([num_tokens, context_len] bool); None: plain causal
        over its own tokens (nothing cached, no window in reach)."""
        if window == 0 or window >= seg.context_len:
            return seg.causal_mask
        if (index, window) not in self._masks:
            device = seg.block_ids.device
            q_pos = torch.arange(seg.context_len - seg.num_tokens, seg.context_len, device=device)[:, None]
            k_pos = torch.arange(seg.context_len, device=device)[None, :]
            self._masks[index, window] = (k_pos <= q_pos) & (k_pos > q_pos - window)
        return self._masks[index, window]

    def _decode(self, layer: int, q: torch.Tensor, batch: DecodeBatch, bias: torch.Tensor) -> torch.Tensor:
        bsz = batch.num_seqs
        kv = self.pool.gather(layer, batch.block_tables)  # [B, nb, bs, 2, kvh, d]
        kv = kv.view(bsz, -1, 2, self.num_kv_heads, self.head_dim)  # [B, L, 2, kvh, d]
        q = q.view(bsz, self.num_kv_heads, self.group, self.head_dim)
        out = torch.empty_like(q)
        cap = self.shape.softcap
        for h in range(self.num_kv_heads):
            keys_t = kv[:, :, 0, h].transpose(1, 2)  # [B, d, L], strided view, no copy
            if cap > 0:
                scores = torch.tanh(torch.bmm(q[:, h], keys_t) * (self.scale / cap)) * cap + bias
            else:
                scores = torch.baddbmm(bias, q[:, h], keys_t, alpha=self.scale)  # [B, g, L]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            torch.bmm(probs, kv[:, :, 1, h], out=out[:, h])
        return out.view(bsz, self.num_heads, self.head_dim)

    def _segment(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                 seg: Segment, mask: torch.Tensor | None) -> torch.Tensor:
        if seg.causal_mask is None:
            # Nothing cached before these tokens: attend to the fresh K/V directly.
            keys, values = k_new, v_new
        else:
            kv = self.pool.gather(layer, seg.block_ids).view(-1, 2, self.num_kv_heads, self.head_dim)
            keys, values = kv[: seg.context_len, 0], kv[: seg.context_len, 1]
        if self.shape.softcap > 0:
            return self._softcapped(q, keys, values, mask)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask, is_causal=mask is None,
            scale=self.scale, enable_gqa=self.group > 1,
        )
        return out.transpose(0, 1)

    def _softcapped(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA cannot cap scores: the same attention spelled out (q [T, h, d], keys/values [L, kvh, d]),
        one KV head's query group at a time (scores of [group, T, L], K/V never repeated)."""
        cap = self.shape.softcap
        if mask is None:
            mask = torch.ones(q.shape[0], keys.shape[0], dtype=torch.bool, device=q.device).tril()
        out = torch.empty_like(q)
        for h in range(self.num_kv_heads):
            heads = slice(h * self.group, (h + 1) * self.group)
            scores = torch.einsum("tgd,ld->gtl", q[:, heads], keys[:, h])
            scores = (torch.tanh(scores * (self.scale / cap)) * cap).masked_fill_(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[:, heads] = torch.einsum("gtl,ld->tgd", probs, values[:, h])
        return out
