"""The CUDA attention backend: one Triton kernel per layer (engine/attention/triton_kernel.py) for every sequence
of the step, K/V read in place from the paged pool, caches in fp32, fp16, bf16 or fp8.

Why Triton: CUDA builds of torch 2.13 ship Triton (3.7), so this installs with torch and compiles nothing at
install time; the flash-attn packages on the index pin other torch versions (vllm-flash-attn 2.6.2 wants
torch 2.4), FlashAttention through SDPA reads no paged cache, and FlexAttention cannot read an fp8 cache.
The same kernel runs in Triton's interpreter on CPU tensors, which is how CI without a GPU tests it.
"""

from __future__ import annotations

import importlib.util

import torch

from common.settings import interpret_triton
from engine.attention.metadata import AttentionMetadata, AttentionShape, PagedMetadata
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
    if page > 128:
        return f"the Triton kernel holds a page in registers: at most 128 tokens, not {page}"
    if not 16 <= shape.head_dim <= 256:
        return f"the Triton kernel's products take head sizes of 16 to 256, not {shape.head_dim}"
    if shape.num_heads % shape.num_kv_heads:
        return f"{shape.num_heads} query heads do not group over {shape.num_kv_heads} KV heads"
    if pool.tensor.is_cuda:
        capability = torch.cuda.get_device_capability(pool.tensor.device)
        if pool.spec.dtype == torch.float8_e4m3fn and capability < (8, 9):
            return f"an fp8 cache needs a GPU of compute capability 8.9 or more (Ada, Hopper), not {capability}"
        if torch.bfloat16 in (pool.spec.dtype, pool.compute_dtype) and capability < (8, 0):
            return f"bf16 needs a GPU of compute capability 8.0 or more (Ampere), not {capability}"
    return None


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
        given = paged or metadata.paged
        if given is None:
            raise ValueError("the Triton backend reads AttentionMetadata.paged (attention_metadata(..., paged=True))")
        self.paged = given

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
