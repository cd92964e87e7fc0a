"""Paged attention as one Triton kernel: every sequence of a step (decodes, prefill chunks after a cached prefix,
speculative verifications) in one launch per layer, K/V read in place from the paged pool through the block
table (no gather), in the cache's dtype (fp32, fp16, bf16 or fp8 e4m3, converted on load).

Work split: program (t, s, h) computes rows t*BLOCK_M .. of sequence s's queries for KV head h, a row being
one (query token, query head of h's group) pair, so a decode packs h's whole query group into one tile and
K/V are read once per group. It walks the sequence's keys, KEYS at a time (whole pages, each row's page
looked up in the block table), from the first its window reaches up to its last query's position, with an
online softmax (running max and sum, rescaled per step).

Runs compiled on CUDA (Triton ships with CUDA torch) and, for the tests, in Triton's interpreter on CPU
tensors: the same source, element for element. The interpreter must be chosen before Triton is imported
(TRITON_INTERPRET=1; engine/attention/triton_backend.py sets it in a process without a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # query rows per program: the smallest tile tl.dot takes
_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_LOG2E = 1.4426950408889634


def _paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, q_starts_ptr, q_lens_ptr, kv_lens_ptr,  # type: ignore[no-untyped-def]
                     sm_scale, softcap, window,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_table,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     PAGE: tl.constexpr, KEYS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                     PRECISION: tl.constexpr):
    tile = tl.program_id(0)  # (first: the one grid axis past 65535 programs, as a long prompt's tiles can be)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + seq)
    if tile * BLOCK_M < q_len * GROUP:  # (tiles past this sequence's rows do nothing)
        q_start = tl.load(q_starts_ptr + seq)
        kv_len = tl.load(kv_lens_ptr + seq)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len * GROUP
        token = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        position = kv_len - q_len + token  # each query's position: it sees keys 0..position
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q_offsets = (q_start + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT)

        first_pos = kv_len - q_len + (tile * BLOCK_M) // GROUP
        last_pos = kv_len - q_len + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        lo = 0
        if window > 0:
            lo = tl.maximum(first_pos - window + 1, 0) // KEYS * KEYS
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        offsets = tl.arange(0, KEYS)
        for key_start in range(lo, last_pos + 1, KEYS):  # KEYS keys (whole pages) a step
            keys = key_start + offsets
            key_ok = keys < kv_len  # (the table is read no further than the context's pages)
            blocks = tl.load(tables_ptr + seq * stride_table + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
            kv_offsets = (blocks[:, None] * stride_kb + (keys % PAGE)[:, None] * stride_kt + kv_head * stride_kh
                          + dims[None, :])
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            if SOFTCAP:  # softcap * tanh(score / softcap), spelled with exp
                scores = softcap * (2.0 / (1.0 + tl.exp(-2.0 * scores / softcap)) - 1.0)
            seen = (keys[None, :] <= position[:, None]) & key_ok[None, :]
            if window > 0:
                seen = seen & (keys[None, :] > position[:, None] - window)
            scores = tl.where(seen, scores * _LOG2E, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # a row with nothing seen yet stays at zero
            weights = tl.exp2(scores - shift[:, None])
            rescale = tl.exp2(top - shift)
            total = total * rescale + tl.sum(weights, 1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(DOT), v, input_precision=PRECISION)
            top = new_top
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        out_offsets = (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


_kernel: Any = triton.jit(_paged_attention)  # (an interpreted function where TRITON_INTERPRET=1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor, kv_lens: torch.Tensor,
                    max_q_len: int, scale: float, window: int = 0, softcap: float = 0.0) -> None:
    """out[t] = attention of q[t] ([T, heads, dim]) over its sequence's context, for S sequences whose queries
    are rows q_starts[s] .. + q_lens[s] and whose contexts (these queries included, last) are kv_lens[s] tokens
    in the pages block_tables[s] of `k_cache`/`v_cache` ([blocks, page, kv_heads, dim] views of one layer; any
    block strides). Metadata is int32 on q's device; `max_q_len` bounds q_lens (it sizes the launch)."""
    num_seqs, num_heads, head_dim = q_lens.shape[0], q.shape[1], q.shape[2]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride() == v_cache.stride() and q.stride(2) == 1 and out.stride(2) == 1
    assert k_cache.stride(3) == 1 and page & (page - 1) == 0 and page >= 16, "pages of 16, 32, 64 ... tokens"
    group = num_heads // num_kv_heads
    grid = (triton.cdiv(max_q_len * group, BLOCK_M), num_seqs, num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    keys = max(page, 64 if block_d <= 128 else 32)  # keys a step: 64 (32 for wide heads), whole pages
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products, as the fp32 oracle
    # products in the compute dtype (bf16/fp16 on tensor cores), fp32 in the interpreter (whose bf16 tl.dot is wrong)
    dot = _DOT_DTYPES[q.dtype] if q.is_cuda else tl.float32
    _kernel[grid](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, kv_lens, scale, softcap, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=BLOCK_M, PAGE=page, KEYS=keys,
        SOFTCAP=softcap > 0, DOT=dot, PRECISION=precision)
