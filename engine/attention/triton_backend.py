"""The CUDA attention backend: one Triton kernel per layer (engine/attention/triton_kernel.py) for every sequence
of the step, K/V read in place from the paged pool, caches in fp32, fp16, bf16 or fp8.

Why Triton: CUDA builds of torch 2.13 ship Triton (3.7), so this installs with torch and compiles nothing at
install time; the flash-attn packages on the index pin other torch versions (vllm-flash-attn 2.6.2 wants
torch 2.4), FlashAttention through SDPA reads no paged cache, and FlexAttention cannot read an fp8 cache.
The same kernel runs in Triton's interpreter on CPU tensors, which is how CI without a GPU tests it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from common.settings import interpret_triton
from engine.attention.metadata import AttentionMetadata, AttentionShape
from engine.kv_cache import KVCachePool

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_attention_problem(pool: KVCachePool, shape: AttentionShape) -> str | None:
    """Why the Triton backend cannot serve this pool and model (None: it can), CUDA aside."""
    if not triton_installed():
        return "Triton is not installed (it comes with CUDA builds of torch: pip install torch==2.13.0 on a GPU " \
               "machine, or scripts/setup.sh --gpu)"
    page = pool.spec.block_size
    if page < 16 or page & (page - 1):
        return f"the Triton kernel reads pages of 16, 32, 64 ... tokens, not {page}"
    if pool.spec.dtype not in TRITON_DTYPES:
        return f"the Triton kernel reads fp32, fp16, bf16 or fp8 e4m3 caches, not {pool.spec.dtype}"
    if shape.num_heads % shape.num_kv_heads:
        return f"{shape.num_heads} query heads do not group over {shape.num_kv_heads} KV heads"
    return None


@dataclass(frozen=True)
class PagedMetadata:
    """The step's sequences as the kernel reads them (int32, on the pool's device): sequence s has queries
    q_starts[s] .. + q_lens[s] and a context of kv_lens[s] tokens (its queries last) in pages block_table[s]."""

    q_starts: torch.Tensor  # [S]
    q_lens: torch.Tensor  # [S]
    kv_lens: torch.Tensor  # [S]
    block_table: torch.Tensor  # [S, max_blocks], padded with pages never read
    max_q_len: int

    @staticmethod
    def from_attention(meta: AttentionMetadata) -> PagedMetadata:
        device = meta.slot_mapping.device
        starts: list[int] = []
        q_lens: list[int] = []
        kv_lens: list[torch.Tensor] = []
        decoding = 0 if meta.decode is None else meta.decode.num_seqs
        if meta.decode is not None:
            starts += range(decoding)
            q_lens += [1] * decoding
            kv_lens.append(meta.decode.context_lens)
        for seg in meta.segments:
            starts.append(seg.token_start)
            q_lens.append(seg.num_tokens)
        widths = [meta.decode.block_tables.shape[1]] if meta.decode is not None else []
        widths += [seg.block_ids.numel() for seg in meta.segments]
        table = torch.zeros(len(starts), max(widths), dtype=torch.int32, device=device)
        if meta.decode is not None:
            table[:decoding, : widths[0]] = meta.decode.block_tables
        for row, seg in enumerate(meta.segments, start=decoding):
            table[row, : seg.block_ids.numel()] = seg.block_ids
        segment_lens = torch.tensor([seg.context_len for seg in meta.segments], dtype=torch.int64, device=device)
        return PagedMetadata(torch.tensor(starts, dtype=torch.int32, device=device),
                             torch.tensor(q_lens, dtype=torch.int32, device=device),
                             torch.cat([*kv_lens, segment_lens]).to(torch.int32), table, max(q_lens))


class TritonAttention:
    def __init__(self, pool: KVCachePool, shape: AttentionShape, metadata: AttentionMetadata,
                 paged: PagedMetadata | None = None) -> None:
        if not pool.tensor.is_cuda:  # tests: the kernel in Triton's interpreter, chosen before Triton's import
            interpret_triton()
        from engine.attention.triton_kernel import paged_attention  # (Triton is imported only where it runs)

        self._kernel = paged_attention
        self.pool = pool
        self.shape = shape
        self.meta = metadata
        self.paged = paged or PagedMetadata.from_attention(metadata)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        shape, paged = self.shape, self.paged
        self.pool.write(layer, self.meta.slot_mapping, k.view(-1, shape.num_kv_heads, shape.head_dim),
                        v.view(-1, shape.num_kv_heads, shape.head_dim))
        cache = self.pool.tensor[layer]  # [blocks, page, 2, kv_heads, head_dim]
        q = q.view(-1, shape.num_heads, shape.head_dim)
        out = torch.empty_like(q)
        self._kernel(q, cache[:, :, 0], cache[:, :, 1], out, paged.block_table, paged.q_starts, paged.q_lens,
                     paged.kv_lens, paged.max_q_len, shape.scale, shape.window(layer), shape.softcap)
        return out.view(-1, shape.num_heads * shape.head_dim)
