"""Decode attention: the C kernel, the torch grouped-matmul path and a dense reference agree."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention.metadata import AttentionMetadata, DecodeBatch
from engine.attention.torch_backend import TorchAttention
from engine.kernels import decode_attention_kernel
from engine.kv_cache import KVCachePool, KVCacheSpec


def dense_reference(q: torch.Tensor, pool: KVCachePool, layer: int, tables: torch.Tensor,
                    lens: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(q)
    group = q.shape[1] // pool.spec.num_kv_heads
    for b in range(q.shape[0]):
        kv = pool.gather(layer, tables[b]).reshape(-1, 2, pool.spec.num_kv_heads, pool.spec.head_dim)[: lens[b]]
        k = kv[:, 0].repeat_interleave(group, dim=1)  # [L, H, D]
        v = kv[:, 1].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b], k) / math.sqrt(q.shape[-1])
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_c", [True, False])
def test_decode_paths_match_dense_reference(kv_dtype: torch.dtype, use_c: bool) -> None:
    if use_c and decode_attention_kernel() is None:
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    spec = KVCacheSpec(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=3, head_dim=64, dtype=kv_dtype)
    pool = KVCachePool(spec, torch.device("cpu"), torch.float32)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(kv_dtype))
    lens = torch.tensor([1, 17, 40, 64, 33])
    width = 4
    tables = torch.randperm(64)[: 5 * width].view(5, width)
    span = torch.arange(width * 16)
    bias = torch.zeros(5, 1, width * 16).masked_fill_((span[None] >= lens[:, None]).unsqueeze(1), float("-inf"))
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), DecodeBatch(tables, lens, bias), (), 5)
    attention = TorchAttention(pool, 9, 3, 64, meta)
    if use_c:
        assert attention.c_kernel is not None  # fp32 compute on CPU with an fp32/bf16 pool takes the C path
    else:
        attention.c_kernel = None
    q = torch.randn(5, 9, 64)
    got = attention._decode(1, q, meta.decode)
    torch.testing.assert_close(got, dense_reference(q, pool, 1, tables, lens), atol=2e-6, rtol=1e-5)
