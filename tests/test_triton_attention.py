"""The Triton paged-attention kernel (engine/attention/triton_kernel.py), compiled on a GPU, and without one in
Triton's interpreter on CPU tensors (the same source), checked against the dense reference of
tests/test_attention.py over one step of decodes, fresh prompts and chunks after cached prefixes, in every
cache dtype it reads."""

from __future__ import annotations

import pytest
import torch

from engine.attention.metadata import AttentionShape
from engine.attention.planning import attention_metadata
from engine.attention.torch_backend import TorchAttention
from engine.attention.triton_backend import TritonAttention, triton_attention_problem, triton_installed
from engine.kv_cache import KVCachePool, KVCacheSpec
from tests.test_attention import Geometry, _dense, _step

pytestmark = pytest.mark.skipif(not triton_installed(), reason="needs Triton (scripts/setup.sh installs it)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXACT = {"atol": 2e-6, "rtol": 1e-5}
ROUNDED = {"atol": 2e-2, "rtol": 2e-2}


def _run(pool: KVCachePool, spans, qkv: torch.Tensor, g: Geometry, shape: AttentionShape,  # type: ignore[no-untyped-def]
         backend: type = TritonAttention) -> torch.Tensor:
    q, k, v = qkv.split((g.heads * g.dim, g.kv_heads * g.dim, g.kv_heads * g.dim), dim=-1)
    meta = attention_metadata(spans, g.block, pool.tensor.device, pool.compute_dtype, cpu_kernel=False,
                              paged=backend is TritonAttention)
    return backend(pool, shape, meta)(1, q, k, v)


@pytest.mark.parametrize(("kv_dtype", "compute", "tolerance"), [
    (torch.float32, torch.float32, EXACT), (torch.bfloat16, torch.bfloat16, ROUNDED),
    (torch.float16, torch.float16, ROUNDED),
    (torch.float8_e4m3fn, torch.float32, EXACT), (torch.float8_e4m3fn, torch.bfloat16, ROUNDED)], ids=str)
def test_every_cache_dtype_matches_the_dense_reference_and_stores_as_the_torch_backend(
        kv_dtype: torch.dtype, compute: torch.dtype, tolerance: dict[str, float]) -> None:
    g = Geometry()
    pool, spans, qkv = _step(kv_dtype, compute, g, DEVICE)
    assert triton_attention_problem(pool, g.shape()) is None
    before = pool.tensor.clone()
    _run(pool, spans, qkv, g, g.shape(), TorchAttention)
    stored = pool.tensor.clone()
    pool.tensor.copy_(before)
    got = _run(pool, spans, qkv, g, g.shape())
    assert torch.equal(pool.tensor.view(torch.uint8), stored.view(torch.uint8))  # the same K/V in the same slots
    q = qkv[:, : g.heads * g.dim]
    # the reference reads K/V back from the pool (fp8: as stored), so only the products' rounding differs
    torch.testing.assert_close(got.float().cpu(), _dense(pool, 1, spans, q, g), **tolerance)


# windows shorter than a page, crossing pages, longer than every context; soft-capping alone and with a window
@pytest.mark.parametrize(("window", "softcap"), [(1, 0.0), (5, 0.0), (20, 0.0), (500, 0.0), (0, 5.0), (20, 5.0)])
def test_sliding_windows_and_soft_capping(window: int, softcap: float) -> None:
    g = Geometry()
    pool, spans, qkv = _step(torch.float32, torch.float32, g, DEVICE)
    got = _run(pool, spans, qkv, g, g.shape(window, softcap))
    torch.testing.assert_close(got.cpu(), _dense(pool, 1, spans, qkv[:, : g.heads * g.dim], g, window, softcap),
                               **EXACT)


# query groups of 1, 2, 4 and 7 heads (a decode's group in one tile, a prefill's rows across tiles), head sizes
# that are no power of two, pages of 16, 32 and 64 tokens
@pytest.mark.parametrize("g", [Geometry(4, 4, 40, 64), Geometry(8, 4, 72, 16), Geometry(8, 2, 64, 32),
                               Geometry(14, 2, 24, 16), Geometry(16, 4, 128, 32)], ids=str)
def test_geometries(g: Geometry) -> None:
    pool, spans, qkv = _step(torch.float32, torch.float32, g, DEVICE)
    got = _run(pool, spans, qkv, g, g.shape())
    torch.testing.assert_close(got.cpu(), _dense(pool, 1, spans, qkv[:, : g.heads * g.dim], g), **EXACT)


def test_the_metadata_lists_every_sequence_in_token_order() -> None:
    g = Geometry()
    pool, spans, _ = _step(torch.float32, torch.float32, g, DEVICE)
    meta = attention_metadata(spans, g.block, pool.tensor.device, torch.float32, cpu_kernel=False, paged=True)
    paged = meta.paged
    assert paged is not None and meta.decode is None and meta.segments == ()  # no masks built
    assert paged.q_lens.tolist() == [s.num_tokens for s in spans]
    assert paged.kv_lens.tolist() == [s.context_len for s in spans]
    assert paged.q_starts.tolist() == [sum(s.num_tokens for s in spans[:i]) for i in range(len(spans))]
    assert paged.max_q_len == max(s.num_tokens for s in spans)
    for row, span in zip(paged.block_table.tolist(), spans, strict=True):
        used = -(-span.context_len // g.block)
        assert row[:used] == list(span.block_table[:used])


@pytest.mark.parametrize(("block", "dtype", "dim", "needle"), [
    (8, torch.float32, 64, "pages of 16"), (24, torch.float32, 64, "pages of 16"),
    (256, torch.float32, 64, "at most 128 tokens"), (16, torch.int8, 64, "fp32, fp16, bf16 or fp8"),
    (16, torch.float32, 8, "head sizes of 16 to 256")])
def test_what_the_kernel_cannot_read_is_named(block: int, dtype: torch.dtype, dim: int, needle: str) -> None:
    spec = KVCacheSpec(1, 4, block, 2, dim, torch.float32)
    pool = KVCachePool(spec, torch.device("cpu"), torch.float32)
    pool.spec = KVCacheSpec(1, 4, block, 2, dim, dtype)  # (the check reads only the spec)
    problem = triton_attention_problem(pool, AttentionShape(4, 2, dim, 0.125))
    assert problem is not None and needle in problem
