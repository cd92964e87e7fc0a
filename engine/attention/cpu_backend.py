"""Paged attention on CPU in C (engine/kernels/paged_attention.c), fp32 or bf16.

One kernel call per layer stores the new tokens' K/V in their slots and attends every decode and
short chunk with K/V read in place from the pool (no gather). The runner cuts the step's queries into
items once per step (`CpuAttentionPlan`); every layer reuses them.

A sequence feeding at least `DENSE_PREFILL_MIN_QUERIES` tokens (a prompt, a long chunk) attends
through torch's CPU flash-attention kernel instead, when the runner allows it (not in batch-invariant
mode, whose rows must not depend on how a prompt was chunked, nor with score soft-capping, which it
lacks): for many queries at once its blocked matmuls (oneDNN's brgemm, AMX tiles for bf16) beat
the C kernel's vector loops (measured on an AMX Xeon, 8 prompts x 512 tokens, 30 layers: 0.27 s vs
0.88 s in bf16, 0.71 s vs 0.89 s in fp32; docs/BENCHMARKS.md). Its K/V are the chunk's own rows for a
fresh prompt (when the cache holds the compute dtype, the values the cache stores), otherwise the
sequence's blocks gathered from the pool after the write. Where the CPU has AMX and the pool and the
compute are bf16, those sequences attend through Tandem's own tile kernel instead
(engine/kernels/flash_prefill.c), all of a step's in one call per layer, K/V read from the pool through
the block tables: it skips the keys a causal query cannot see, which torch's kernel computes within each
512-key block (measured on an AMX Xeon, 4 prompts x 512 tokens, SmolLM2's 9 heads: 2.4 vs 4.3 ms a
layer; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, AttentionShape
from engine.kernels import DTYPE_CODES, attention_kernel, flash_prefill_kernel
from engine.kv_cache import KVCachePool

MAX_ITEM_QUERIES = 16  # MAX_TILE of the kernel: consecutive queries of one sequence per work item
DENSE_PREFILL_MIN_QUERIES = 64  # a sequence feeding this many tokens in a step goes to torch's flash kernel
# ... while its context is at most this many times its new tokens: past that the gathered K/V and the mask
# (context-long) outweigh the gain, and the C kernel, which reads K/V in place, keeps it
DENSE_MAX_CONTEXT_PER_QUERY = 4
# With the AMX tile kernel: from this many tokens, whatever the context (bench.prefill_attention on an AMX Xeon,
# 9 heads / 3 kv heads, bf16, a layer against the paged kernel: 4 x 16 new tokens after 2000 cached 1.15 vs
# 3.50 ms, 8 x 16 after 100 0.19 vs 0.45 ms, 4 x 100 after 2000 3.61 vs 22.3 ms; 8 fresh prompts of 16 tokens
# 0.10 vs 0.08 ms)
AMX_PREFILL_MIN_QUERIES = 16
AMX_PREFILL_DIMS = (32, 64, 96, 128)  # head dims flash_prefill.c takes (whole Q tiles, at most four)


def tiles_take(pool: KVCachePool, shape: AttentionShape) -> bool:
    """The tile kernel computes this pool's and shape's attention: bf16 compute and cache, a head dim it
    takes, no score cap."""
    return (pool.compute_dtype == torch.bfloat16 and pool.spec.dtype == torch.bfloat16 and not shape.softcap
            and shape.head_dim in AMX_PREFILL_DIMS and shape.num_heads % shape.num_kv_heads == 0)


def amx_prefill_supported(pool: KVCachePool, shape: AttentionShape) -> bool:
    """Long prefill segments of this pool and shape attend on AMX tiles: the tile kernel takes them and
    the CPU's OS grants AMX tile data (elsewhere its tile operations would run as plain C, slowly)."""
    if not tiles_take(pool, shape):
        return False
    lib = flash_prefill_kernel()
    return lib is not None and lib.flash_prefill_uses_amx() == 1


def cpu_attention_supported(pool: KVCachePool, head_dim: int, num_heads: int) -> bool:
    """The C kernel applies: a CPU pool, fp32/bf16 compute and cache, shapes within its limits."""
    return (pool.tensor.device.type == "cpu" and pool.compute_dtype in DTYPE_CODES and pool.spec.dtype in DTYPE_CODES
            and head_dim % 8 == 0 and head_dim <= 256 and num_heads <= 128 and pool.spec.block_size <= 64
            and attention_kernel() is not None)


@dataclass(frozen=True)
class DensePrefill:
    """A sequence of the step attended by torch's flash kernel: it feeds tokens `token ..
    token + count - 1` of the step, at positions `start ..`."""

    seq: int  # its row of the plan's tables
    token: int
    count: int
    start: int


@dataclass(frozen=True)
class CpuAttentionPlan:
    """Per step: each sequence's block table row, the kernel's work items (runs of <=
    MAX_ITEM_QUERIES consecutive query tokens of one sequence: its table row, first token, count,
    first position), and the sequences left to torch's flash kernel (none of their tokens is in an
    item)."""

    tables: torch.Tensor  # [S, width] int64, padded with block 0 (never read past a context)
    item_seq: torch.Tensor  # [I] int32
    item_token: torch.Tensor  # [I] int32
    item_count: torch.Tensor  # [I] int32
    item_pos0: torch.Tensor  # [I] int64
    dense: tuple[DensePrefill, ...] = ()

    @staticmethod
    def build(spans: list[tuple[list[int], int, int]], dense_min_queries: int = 0,
              dense_max_context_per_query: int = DENSE_MAX_CONTEXT_PER_QUERY) -> CpuAttentionPlan:
        """`spans`: per scheduled sequence, in token order: (its block ids up to its context after
        the step, first position fed, number of tokens fed). A sequence feeding at least
        `dense_min_queries` tokens (0: none does), with a context at most `dense_max_context_per_query`
        times that (0: any), is left to the dense path (torch's flash kernel or the AMX tiles)."""
        width = max(len(blocks) for blocks, _, _ in spans)
        tables = [blocks + [0] * (width - len(blocks)) for blocks, _, _ in spans]
        seq, token, count, pos0 = [], [], [], []
        dense = []
        first_token = 0
        for s, (_, start, num_tokens) in enumerate(spans):
            if 0 < dense_min_queries <= num_tokens and (
                    not dense_max_context_per_query or start + num_tokens <= dense_max_context_per_query * num_tokens):
                dense.append(DensePrefill(s, first_token, num_tokens, start))
                first_token += num_tokens
                continue
            for offset in range(0, num_tokens, MAX_ITEM_QUERIES):
                seq.append(s)
                token.append(first_token + offset)
                count.append(min(MAX_ITEM_QUERIES, num_tokens - offset))
                pos0.append(start + offset)
            first_token += num_tokens
        i32 = torch.int32
        return CpuAttentionPlan(torch.tensor(tables, dtype=torch.int64), torch.tensor(seq, dtype=i32),
                                torch.tensor(token, dtype=i32), torch.tensor(count, dtype=i32),
                                torch.tensor(pos0, dtype=torch.int64), tuple(dense))


class CpuAttention:
    def __init__(self, pool: KVCachePool, shape: AttentionShape, metadata: AttentionMetadata,
                 tiles: bool = True) -> None:
        """`tiles`: the plan's dense sequences may take the AMX tile kernel where it is supported (False:
        torch's flash kernel, for comparisons)."""
        assert metadata.cpu is not None, "the runner plans CPU attention once per step"
        self.pool, self.meta, self.plan, self.shape = pool, metadata, metadata.cpu, shape
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        lib = attention_kernel()
        assert lib is not None, "cpu_attention_supported was checked"
        self.lib: ctypes.CDLL = lib
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # DensePrefill masks of this step, per window
        # the plan's dense sequences for the AMX kernel (first rows, lengths, first positions, table rows), or None
        self._tiles: tuple[torch.Tensor, ...] | None = None
        self._scratch: torch.Tensor | None = None  # their packed K/V, one buffer for every layer of the step
        dense = self.plan.dense
        if dense and tiles and amx_prefill_supported(pool, shape):
            self._tiles = (torch.tensor([p.token for p in dense], dtype=torch.int32),
                           torch.tensor([p.count for p in dense], dtype=torch.int32),
                           torch.tensor([p.start for p in dense], dtype=torch.int64),
                           torch.tensor([p.seq for p in dense], dtype=torch.int32))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qkv, row_stride = self._packed(q, k, v)
        tokens = qkv.shape[0]
        out = q.new_empty((tokens, self.num_heads * self.head_dim))
        plan, pool = self.plan, self.pool
        cache = pool.tensor[layer]
        status = self.lib.paged_attention(
            qkv.data_ptr(), row_stride, DTYPE_CODES[qkv.dtype], tokens, self.meta.slot_mapping.data_ptr(),
            cache.data_ptr(), DTYPE_CODES[cache.dtype], plan.tables.data_ptr(), plan.tables.shape[1],
            plan.item_seq.data_ptr(),
            plan.item_token.data_ptr(), plan.item_count.data_ptr(), plan.item_pos0.data_ptr(), plan.item_seq.numel(),
            out.data_ptr(), self.num_heads, self.num_kv_heads, self.head_dim, pool.spec.block_size, self.shape.scale,
            self.shape.window(layer), self.shape.softcap, torch.get_num_threads())
        if status != 0:
            raise RuntimeError("the CPU attention kernel refused its inputs (cpu_attention_supported disagrees)")
        # after the kernel stored every new K/V row
        if self._tiles is not None:
            self._dense_on_tiles(layer, qkv, row_stride, out, cache)
        else:
            for prefill in plan.dense:
                self._dense(layer, prefill, qkv, out)
        return out

    def _dense_on_tiles(self, layer: int, qkv: torch.Tensor, row_stride: int, out: torch.Tensor,
                        cache: torch.Tensor) -> None:
        """The plan's dense sequences through the AMX tile kernel, into their rows of `out`."""
        assert self._tiles is not None
        first, count, start, seq = self._tiles
        lib = flash_prefill_kernel()
        assert lib is not None, "amx_prefill_supported was checked"
        if self._scratch is None:  # sized for the widest window of the model's layers (0: none), which packs most
            windows = self.shape.windows
            widest = 0 if not windows or 0 in windows else max(windows)
            size = lib.flash_prefill_scratch(count.data_ptr(), start.data_ptr(), first.numel(), self.num_kv_heads,
                                             self.head_dim, widest)
            self._scratch = torch.empty(size, dtype=torch.bfloat16)
        tables = self.plan.tables
        status = lib.flash_prefill(qkv.data_ptr(), row_stride, first.data_ptr(), count.data_ptr(), start.data_ptr(),
                                   seq.data_ptr(), first.numel(), cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                                   self.pool.spec.block_size, out.data_ptr(), out.stride(0), self.num_heads,
                                   self.num_kv_heads, self.head_dim, self.shape.scale, self.shape.window(layer),
                                   self._scratch.data_ptr(), torch.get_num_threads())
        if status == -2:
            raise MemoryError("the AMX prefill kernel could not allocate its packed K/V")
        if status != 0:
            raise RuntimeError(f"the AMX prefill kernel refused its inputs ({status}; amx_prefill_supported disagrees)")

    def _dense(self, layer: int, prefill: DensePrefill, qkv: torch.Tensor, out: torch.Tensor) -> None:
        """One sequence's queries through torch's CPU flash kernel, into its rows of `out`."""
        heads, kv_heads, dim, group = self.num_heads, self.num_kv_heads, self.head_dim, self.shape.group
        rows = qkv[prefill.token:prefill.token + prefill.count]
        q = rows[:, :heads * dim].view(-1, heads, dim)
        context = prefill.start + prefill.count
        window = self.shape.window(layer)
        first_key = max(0, prefill.start - window + 1) if window else 0  # no query of the chunk sees before it
        if prefill.start == 0 and self.pool.spec.dtype == q.dtype:  # a fresh prompt: its own rows are its K/V
            k = rows[:, heads * dim:(heads + kv_heads) * dim].view(-1, kv_heads, dim)
            v = rows[:, (heads + kv_heads) * dim:(heads + 2 * kv_heads) * dim].view(-1, kv_heads, dim)
        else:
            block_size = self.pool.spec.block_size
            first_block = first_key // block_size
            blocks = self.plan.tables[prefill.seq, first_block:-(-context // block_size)]
            kv = self.pool.gather(layer, blocks).view(-1, 2, kv_heads, dim)[first_key - first_block * block_size:]
            kv = kv[:context - first_key]
            k, v = kv[:, 0], kv[:, 1]
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if prefill.start == 0 and window == 0:  # plain causal: torch's flash kernel, kv heads shared in place
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=self.shape.scale,
                                               enable_gqa=group > 1)
        else:  # a mask: with GQA SDPA would fall back to its math path, so every query head gets its K/V
            if group > 1:
                k4, v4 = k4.repeat_interleave(group, dim=1), v4.repeat_interleave(group, dim=1)
            mask = self._mask(prefill, window, first_key, q.dtype)
            o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q4, k4, v4, 0.0, False, attn_mask=mask, scale=self.shape.scale)[0]
        out[prefill.token:prefill.token + prefill.count].view(-1, heads, dim).copy_(o[0].transpose(0, 1))

    def _mask(self, prefill: DensePrefill, window: int, first_key: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive `[count, context - first_key]` mask over keys first_key ..: query i (position
        start + i) sees keys start + i - window + 1 .. start + i (from 0 without a window). Built once
        per (sequence, window) per step."""
        key = (prefill.seq, window)
        mask = self._masks.get(key)
        if mask is None:
            positions = torch.arange(prefill.start, prefill.start + prefill.count)[:, None]
            keys = torch.arange(first_key, prefill.start + prefill.count)[None, :]
            visible = keys <= positions
            if window:
                visible &= keys > positions - window
            mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
            self._masks[key] = mask
        return mask

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
