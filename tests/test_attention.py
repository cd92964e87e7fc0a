"""Paged attention over one step of decodes and prefill chunks: the C kernel (cpu_backend.py), the
torch backend and a dense reference agree, and both backends store the step's K/V in the same slots."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from engine.attention.cpu_backend import DENSE_PREFILL_MIN_QUERIES, CpuAttention, cpu_attention_supported
from engine.attention.metadata import AttentionShape
from engine.attention.planning import SeqSpan, attention_metadata
from engine.attention.torch_backend import TorchAttention
from engine.kv_cache import KVCachePool, KVCacheSpec

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
# decodes first (contexts 1, 17, 40, exactly one block, two, 101), then segments: a fresh prompt, a
# chunk after a cached prefix crossing the kernel's 16-query items, a long fresh chunk, a one-block
# prefix + 1, a chunk past the kernel's first 64-key chunk (a short window starts there)
SHAPES = [(0, 1), (16, 1), (39, 1), (15, 1), (31, 1), (100, 1), (0, 37), (20, 19), (0, 70), (16, 2), (90, 20)]
SHAPE = AttentionShape(HEADS, KV_HEADS, DIM, DIM ** -0.5)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Geometry:
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    dim: int = DIM
    block: int = BLOCK

    def shape(self, window: int = 0, softcap: float = 0.0) -> AttentionShape:
        """Layer 1 (the one these tests run) has `window`."""
        return AttentionShape(self.heads, self.kv_heads, self.dim, self.dim ** -0.5,
                              (0, window) if window else (), softcap)


def _step(kv_dtype: torch.dtype, compute: torch.dtype, g: Geometry = Geometry(),
          device: torch.device = CPU) -> tuple[KVCachePool, list[SeqSpan], torch.Tensor]:
    torch.manual_seed(0)
    num_blocks = sum(-(-(start + count) // g.block) for start, count in SHAPES) + 8
    spec = KVCacheSpec(num_layers=2, num_blocks=num_blocks, block_size=g.block, num_kv_heads=g.kv_heads,
                       head_dim=g.dim, dtype=kv_dtype)
    pool = KVCachePool(spec, device, compute)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(kv_dtype))  # the cached prefixes (and garbage elsewhere)
    free = torch.randperm(num_blocks).tolist()
    spans = []
    for start, count in SHAPES:
        need = -(-(start + count) // g.block)
        spans.append(SeqSpan([free.pop() for _ in range(need)], start, count))
    tokens = sum(c for _, c in SHAPES)
    qkv = torch.randn(tokens, (g.heads + 2 * g.kv_heads) * g.dim).to(device, compute)
    return pool, spans, qkv


def _dense(pool: KVCachePool, layer: int, spans: list[SeqSpan], q: torch.Tensor,
           g: Geometry = Geometry(), window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Each query against keys 0 .. its position (the last `window` of them, with a window), read
    back from the pool after the step's write; scores capped at `softcap` if given."""
    out, row, q = torch.empty(q.shape[0], g.heads, g.dim), 0, q.cpu()
    for span in spans:
        blocks = torch.tensor(list(span.block_table), device=pool.tensor.device)
        kv = pool.gather(layer, blocks).reshape(-1, 2, g.kv_heads, g.dim).float().cpu()
        for i in range(span.num_tokens):
            seen = span.start + i + 1
            low = max(0, seen - window) if window else 0
            k = kv[low:seen, 0].repeat_interleave(g.heads // g.kv_heads, dim=1)
            v = kv[low:seen, 1].repeat_interleave(g.heads // g.kv_heads, dim=1)
            scores = torch.einsum("hd,lhd->hl", q[row].view(g.heads, g.dim).float(), k) / math.sqrt(g.dim)
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            out[row] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
            row += 1
    return out.view(q.shape[0], -1)


@pytest.mark.parametrize(("kv_dtype", "compute"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
def test_cpu_kernel_and_torch_backend_match_a_dense_reference(kv_dtype: torch.dtype, compute: torch.dtype) -> None:
    pool, spans, qkv = _step(kv_dtype, compute)
    assert cpu_attention_supported(pool, DIM, HEADS)
    q, k, v = qkv.split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), dim=-1)
    before = pool.tensor.clone()
    results, pools = {}, {}
    for name, cpu in (("cpu", True), ("torch", False)):
        pool.tensor.copy_(before)
        meta = attention_metadata(spans, BLOCK, pool.tensor.device, compute, cpu_kernel=cpu)
        backend = (CpuAttention if cpu else TorchAttention)(pool, SHAPE, meta)
        results[name] = backend(1, q, k, v).float()
        pools[name] = pool.tensor.clone()
    assert torch.equal(pools["cpu"], pools["torch"])  # the same K/V in the same slots, bit for bit
    assert torch.equal(pools["cpu"][0], before[0])  # another layer untouched
    reference = _dense(pool, 1, spans, q)
    exact = {"atol": 2e-6, "rtol": 1e-5}
    bf16 = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(results["cpu"], reference, **(exact if compute == torch.float32 else bf16))
    # the torch backend attends to a fresh prompt's own K/V before the cache's rounding: bf16-close there
    torch.testing.assert_close(results["torch"], reference, **(exact if kv_dtype == torch.float32 else bf16))


# kv groups of 1, 2, 4 and 7 query heads (head blocks and their remainders), head sizes that are not
# a multiple of 32, blocks of one token and of 64 (a whole key chunk)
@pytest.mark.parametrize("g", [Geometry(4, 4, 40, 64), Geometry(8, 4, 72, 16), Geometry(8, 2, 64, 1),
                               Geometry(14, 2, 24, 8), Geometry(16, 4, 128, 32)], ids=str)
def test_cpu_kernel_geometries(g: Geometry) -> None:
    pool, spans, qkv = _step(torch.float32, torch.float32, g)
    assert cpu_attention_supported(pool, g.dim, g.heads)
    q, k, v = qkv.split((g.heads * g.dim, g.kv_heads * g.dim, g.kv_heads * g.dim), dim=-1)
    meta = attention_metadata(spans, g.block, pool.tensor.device, torch.float32, cpu_kernel=True)
    got = CpuAttention(pool, g.shape(), meta)(1, q, k, v)
    torch.testing.assert_close(got, _dense(pool, 1, spans, q, g), atol=2e-6, rtol=1e-5)


def test_the_kernel_reads_q_k_v_from_packed_or_separate_buffers() -> None:
    """The projection's own buffer is read in place; separate tensors are packed first; same result."""
    pool, spans, qkv = _step(torch.float32, torch.float32)
    meta = attention_metadata(spans, BLOCK, pool.tensor.device, torch.float32, cpu_kernel=True)
    attention = CpuAttention(pool, SHAPE, meta)
    q, k, v = qkv.split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), dim=-1)
    assert attention._packed(q, k, v)[0].data_ptr() == qkv.data_ptr()
    in_place = attention(0, q, k, v)
    separate = attention(0, q.clone(), k.clone(), v.clone())
    assert torch.equal(in_place, separate)


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (5, 0.0), (20, 5.0)])
def test_a_query_is_computed_alike_in_any_batch(window: int, softcap: float) -> None:
    """Batch invariance: a decode alone and amid other work gives bit-identical output, with or
    without a window (whose first key chunk depends on the position, not the batch) or a cap."""
    shape = Geometry().shape(window, softcap)
    pool, spans, qkv = _step(torch.float32, torch.float32)
    q, k, v = qkv.split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), dim=-1)
    meta = attention_metadata(spans, BLOCK, pool.tensor.device, torch.float32, cpu_kernel=True)
    together = CpuAttention(pool, shape, meta)(1, q, k, v)
    for i in (2, 5):  # contexts 40 and 101
        alone_meta = attention_metadata(spans[i:i + 1], BLOCK, pool.tensor.device, torch.float32, cpu_kernel=True)
        alone = CpuAttention(pool, shape, alone_meta)(1, q[i:i + 1], k[i:i + 1], v[i:i + 1])
        assert torch.equal(alone, together[i:i + 1])


# windows shorter than a block, crossing blocks and the kernel's 64-key chunks, longer than every
# context; soft-capping alone and with a window (the scores of these random q/k reach ±10, so a cap
# of 5 bites)
@pytest.mark.parametrize(("window", "softcap"), [(1, 0.0), (5, 0.0), (20, 0.0), (65, 0.0), (500, 0.0), (0, 5.0),
                                                 (20, 5.0)])
@pytest.mark.parametrize("block", [16, 64])
def test_sliding_windows_and_soft_capping(window: int, softcap: float, block: int) -> None:
    g = Geometry(block=block)
    pool, spans, qkv = _step(torch.float32, torch.float32, g)
    q, k, v = qkv.split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), dim=-1)
    before = pool.tensor.clone()
    for cpu in (True, False):
        pool.tensor.copy_(before)
        meta = attention_metadata(spans, block, pool.tensor.device, torch.float32, cpu_kernel=cpu)
        got = (CpuAttention if cpu else TorchAttention)(pool, g.shape(window, softcap), meta)(1, q, k, v)
        want = _dense(pool, 1, spans, q, g, window, softcap)
        torch.testing.assert_close(got, want, atol=4e-6, rtol=1e-5, msg=lambda m, cpu=cpu: f"cpu={cpu}: {m}")
    assert (window in (0, 500)) == torch.allclose(want, _dense(pool, 1, spans, q, g, 0, softcap), atol=1e-4)
    assert (softcap == 0) == torch.allclose(want, _dense(pool, 1, spans, q, g, window), atol=1e-4)  # each bit


# fresh prompts (causal, K/V from the chunk itself) and chunks after cached prefixes (K/V gathered from
# the pool, an explicit mask; with a window of 40, from key start - 39), long enough for torch's flash
# kernel, beside what the C kernel keeps: decodes, a 63-token prompt, a chunk after a prefix of more
# than 3x its length
DENSE_SHAPES = [(0, 1), (30, 1), (0, 100), (50, 70), (0, 64), (16, 80), (0, 63), (300, 64)]


@pytest.mark.parametrize(("kv_dtype", "compute"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("window", [0, 40])
def test_long_prompts_through_torch_flash_match_the_kernel(kv_dtype: torch.dtype, compute: torch.dtype,
                                                           window: int) -> None:
    """Sequences feeding >= DENSE_PREFILL_MIN_QUERIES tokens attend through torch's CPU flash kernel:
    the same K/V stored, the same output as the C kernel to rounding (fp32: the same to 1e-6), and the
    rows of the other sequences bit for bit as before."""
    torch.manual_seed(0)
    num_blocks = sum(-(-(s + c) // BLOCK) for s, c in DENSE_SHAPES) + 4
    pool = KVCachePool(KVCacheSpec(2, num_blocks, BLOCK, KV_HEADS, DIM, kv_dtype), torch.device("cpu"), compute)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(kv_dtype))
    free = torch.randperm(num_blocks).tolist()
    spans = [SeqSpan([free.pop() for _ in range(-(-(s + c) // BLOCK))], s, c) for s, c in DENSE_SHAPES]
    qkv = torch.randn(sum(c for _, c in DENSE_SHAPES), (HEADS + 2 * KV_HEADS) * DIM).to(compute)
    q, k, v = qkv.split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), dim=-1)
    shape = Geometry().shape(window)
    before = pool.tensor.clone()
    results, pools = {}, {}
    for dense_min in (0, DENSE_PREFILL_MIN_QUERIES):
        pool.tensor.copy_(before)
        meta = attention_metadata(spans, BLOCK, pool.tensor.device, compute, cpu_kernel=True,
                                  dense_min_queries=dense_min)
        assert meta.cpu is not None and len(meta.cpu.dense) == (4 if dense_min else 0)
        results[dense_min] = CpuAttention(pool, shape, meta)(1, q, k, v).float()
        pools[dense_min] = pool.tensor.clone()
    assert torch.equal(pools[0], pools[DENSE_PREFILL_MIN_QUERIES])
    kernel, dense = results[0], results[DENSE_PREFILL_MIN_QUERIES]
    starts = [sum(c for _, c in DENSE_SHAPES[:i]) for i in range(len(DENSE_SHAPES))]
    kept = [row for i in (0, 1, 6, 7) for row in range(starts[i], starts[i] + DENSE_SHAPES[i][1])]
    assert torch.equal(kernel[kept], dense[kept])  # the kernel's rows, bit for bit
    tolerance = {"atol": 2e-6, "rtol": 1e-5} if compute == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(dense, kernel, **tolerance)
    torch.testing.assert_close(dense, _dense(pool, 1, spans, q, Geometry(), window), **tolerance)


def test_batch_invariant_and_capped_runners_keep_long_prompts_in_the_kernel(tiny_llama_dir, tiny_gemma2_dir) -> None:
    from engine import LLM

    assert LLM(str(tiny_llama_dir), num_kv_blocks=64).engine.runner.dense_min_queries == DENSE_PREFILL_MIN_QUERIES
    assert LLM(str(tiny_llama_dir), num_kv_blocks=64, deterministic=True).engine.runner.dense_min_queries == 0
    assert LLM(str(tiny_gemma2_dir), num_kv_blocks=64).engine.runner.dense_min_queries == 0  # soft-capped scores
