"""A step's attention metadata, from what each scheduled sequence feeds (`SeqSpan`, in the step's
token order: single-token decodes first, then multi-token segments). The runner builds one per step;
every layer's attention reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention.cpu_backend import DENSE_MAX_CONTEXT_PER_QUERY, CpuAttentionPlan
from engine.attention.metadata import AttentionMetadata, DecodeBatch, PagedMetadata, Segment


@dataclass(frozen=True)
class SeqSpan:
    """A sequence's part of a step: it feeds tokens at positions [start, start + num_tokens)."""

    block_table: Sequence[int]  # its blocks, covering at least start + num_tokens slots
    start: int
    num_tokens: int

    @property
    def context_len(self) -> int:
        return self.start + self.num_tokens


def slot_mapping(spans: Sequence[SeqSpan], block_size: int) -> list[int]:
    """The cache slot of every token the step feeds, in token order."""
    return [span.block_table[p // block_size] * block_size + p % block_size
            for span in spans for p in range(span.start, span.context_len)]


def attention_metadata(spans: Sequence[SeqSpan], block_size: int, device: torch.device, dtype: torch.dtype,
                       cpu_kernel: bool, dense_min_queries: int = 0,
                       dense_max_context_per_query: int = DENSE_MAX_CONTEXT_PER_QUERY,
                       paged: bool = False) -> AttentionMetadata:
    """For the C kernel, its plan (sequences feeding at least `dense_min_queries` tokens, 0: none, with
    a context at most `dense_max_context_per_query` times that, 0: any, attended by the dense path);
    `paged`: the Triton kernel's sequences (no masks); otherwise the decode batch and the segments the
    torch backend reads. A leading run of single-token spans is the decode batch."""
    slots = torch.tensor(slot_mapping(spans, block_size), dtype=torch.int64, device=device)
    num_tokens = sum(s.num_tokens for s in spans)
    if paged:
        return AttentionMetadata(slots, None, (), num_tokens, paged=paged_metadata(spans, block_size, device))
    if cpu_kernel:
        plan = CpuAttentionPlan.build([(list(s.block_table[:-(-s.context_len // block_size)]), s.start, s.num_tokens)
                                       for s in spans], dense_min_queries, dense_max_context_per_query)
        return AttentionMetadata(slots, None, (), num_tokens, plan)
    num_decodes = next((i for i, s in enumerate(spans) if s.num_tokens != 1), len(spans))
    decode = _decode_batch(spans[:num_decodes], block_size, device, dtype) if num_decodes else None
    return AttentionMetadata(slots, decode, _segments(spans[num_decodes:], num_decodes, block_size, device),
                             num_tokens)


def paged_metadata(spans: Sequence[SeqSpan], block_size: int, device: torch.device) -> PagedMetadata:
    """The Triton kernel's view of the step: each span's queries, context and pages, in token order."""
    starts = [0]
    for span in spans[:-1]:
        starts.append(starts[-1] + span.num_tokens)
    q_lens = [s.num_tokens for s in spans]
    width = max(-(-s.context_len // block_size) for s in spans)
    # padding pages are never read: a sequence reads pages up to its own context only
    table = [b for s in spans for b in (*s.block_table[:width], *[0] * (width - min(len(s.block_table), width)))]
    # one copy to the device for all four (views of one tensor)
    rows = torch.tensor([*starts, *q_lens, *(s.context_len for s in spans), *table], dtype=torch.int32,
                        device=device)
    n = len(spans)
    return PagedMetadata(rows[:n], rows[n:2 * n], rows[2 * n:3 * n], rows[3 * n:].view(n, width), max(q_lens))


def _decode_batch(decodes: Sequence[SeqSpan], block_size: int, device: torch.device,
                  dtype: torch.dtype) -> DecodeBatch:
    lens = [d.start + 1 for d in decodes]
    width = -(-max(lens) // block_size)
    # Pad with block 0: positions past a sequence's context are masked by `bias`.
    tables = [list(d.block_table[:width]) + [0] * (width - min(len(d.block_table), width)) for d in decodes]
    context_lens = torch.tensor(lens, dtype=torch.int64, device=device)
    span = torch.arange(width * block_size, device=device)
    bias = torch.zeros(len(decodes), 1, width * block_size, dtype=dtype, device=device)
    bias.masked_fill_((span[None, :] >= context_lens[:, None]).unsqueeze(1), float("-inf"))
    return DecodeBatch(torch.tensor(tables, dtype=torch.int64, device=device), context_lens, bias)


def _segments(spans: Sequence[SeqSpan], token_start: int, block_size: int,
              device: torch.device) -> tuple[Segment, ...]:
    segments = []
    for span in spans:
        mask = None
        if span.start > 0:
            q_pos = torch.arange(span.start, span.context_len, device=device)
            mask = torch.arange(span.context_len, device=device)[None, :] <= q_pos[:, None]
        blocks = torch.tensor(list(span.block_table[:-(-span.context_len // block_size)]), dtype=torch.int64,
                              device=device)
        segments.append(Segment(token_start, span.num_tokens, span.context_len, blocks, mask))
        token_start += span.num_tokens
    return tuple(segments)
