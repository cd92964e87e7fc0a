"""CUDA-graph capture of decode-only steps (Triton attention backend), one graph per batch-size bucket, replayed
for any batch up to the largest bucket (padded up to the next one).

Padding rows write their K/V into the pool's scratch block, which no sequence ever owns, and their outputs are
dropped. Graphs share one memory pool and static input buffers; a replay only copies the step's inputs into
those buffers. What captures and replays sits behind `GraphCapture`, so the buffers, padding and bucket choice
run on CPU in tests (`EagerCapture` replays by running the same forward again over the same buffers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from engine.attention.metadata import AttentionMetadata, AttentionShape, PagedMetadata
from engine.attention.triton_backend import TritonAttention
from engine.kv_cache import KVCachePool
from engine.models.llama import LlamaForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes captured for up to `max_batch` sequences: the standard buckets below it, and
    `max_batch` itself on top (so every decode batch the scheduler can form has a graph)."""
    if max_batch < 1:
        raise ValueError(f"CUDA graphs need a batch of >= 1 sequence, got {max_batch}")
    below = tuple(b for b in BATCH_BUCKETS if b < max_batch)
    return (*below, max_batch)


def bucket_for(num_seqs: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `num_seqs` sequences (None: more than the largest; run eagerly)."""
    return next((b for b in buckets if b >= num_seqs), None)


Replay = Callable[[], torch.Tensor]


Buffers = Callable[[], tuple[torch.Tensor, ...]]  # the static input buffers as they are now


class GraphCapture(Protocol):
    """Turns a forward over static buffers into something that reruns it (and returns its output buffer)."""

    def capture(self, forward: Callable[[], torch.Tensor], buffers: Buffers) -> Replay: ...


class CudaCapture:
    """torch.cuda.CUDAGraph, every graph in one memory pool (captured largest first, so the smaller ones
    reuse its memory)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Callable[[], torch.Tensor], buffers: Buffers) -> Replay:
        forward()  # warm-up outside the graph (Triton compiles here)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return output
        return replay


class EagerCapture:
    """Replays by running the forward again: what a graph replay computes, for tests on CPU. A graph reads the
    memory its buffers had at capture, so a replay here first checks that every buffer is still that memory
    (a buffer re-bound instead of copied into would be read stale by a real graph)."""

    def __init__(self) -> None:
        self.captured: list[int] = []  # how many forwards were captured (one per bucket)

    def capture(self, forward: Callable[[], torch.Tensor], buffers: Buffers) -> Replay:
        self.captured.append(1)
        captured = [b.data_ptr() for b in buffers()]

        def replay() -> torch.Tensor:
            if [b.data_ptr() for b in buffers()] != captured:
                raise AssertionError("a static buffer of the graphs was re-bound, not copied into")
            return forward()
        return replay


class CudaGraphDecoder:
    def __init__(self, model: LlamaForCausalLM, pool: KVCachePool, max_batch: int, max_model_len: int,
                 capture: GraphCapture | None = None) -> None:
        self.model, self.pool = model, pool
        device = pool.tensor.device
        self.buckets = batch_buckets(max_batch)
        n = self.buckets[-1]
        self.max_blocks = -(-max_model_len // pool.spec.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), pool.scratch_slot, dtype=torch.int64, device=device)
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.full((n, self.max_blocks), pool.scratch_block, dtype=torch.int32, device=device)
        self.q_starts = torch.arange(n, dtype=torch.int32, device=device)
        self.q_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.shape = AttentionShape.of(model.config)
        capture = capture or CudaCapture()
        with torch.inference_mode():
            # largest first: a CUDA capture's smaller graphs reuse the largest one's memory
            self.replays = {b: capture.capture(functools.partial(self._forward, b), self._buffers)
                            for b in reversed(self.buckets)}

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.positions, self.slots, self.kv_lens, self.tables, self.q_starts, self.q_lens)

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.slots[:b], decode=None, segments=(), num_tokens=b)
        paged = PagedMetadata(self.q_starts[:b], self.q_lens[:b], self.kv_lens[:b], self.tables[:b], 1)
        return self.model(self.input_ids[:b], self.positions[:b], TritonAttention(self.pool, self.shape, meta, paged))

    def can_run(self, meta: AttentionMetadata) -> bool:
        paged = meta.paged
        return (paged is not None and paged.max_q_len == 1 and not meta.groups  # decodes only, one table per step
                and bucket_for(meta.num_tokens, self.buckets) is not None
                and paged.block_table.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        paged = meta.paged
        assert paged is not None
        n = meta.num_tokens
        b = bucket_for(n, self.buckets)
        assert b is not None, "can_run said no"
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slots.fill_(self.pool.scratch_slot)
        self.slots[:n] = meta.slot_mapping
        self.kv_lens.fill_(1)  # padding rows: one key, the scratch slot their own K/V went to
        self.kv_lens[:n] = paged.kv_lens
        self.tables.fill_(self.pool.scratch_block)
        width = paged.block_table.shape[1]
        self.tables[:n, :width] = paged.block_table
        return self.replays[b]()[:n]
