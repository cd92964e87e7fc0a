"""CUDA-graph capture of decode-only steps (flash backend), replayed for padded batch sizes.

Padding rows write their K/V into the pool's scratch block, which no sequence ever owns, and their
outputs are dropped. Graphs share one memory pool and static input buffers; a replay only copies
the step's inputs into those buffers.
"""

from __future__ import annotations

import torch

from engine.attention.flash_backend import FlashAttention, FlashMetadata
from engine.attention.metadata import AttentionMetadata, AttentionShape
from engine.kv_cache import KVCachePool
from engine.models.llama import LlamaForCausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class CudaGraphDecoder:
    def __init__(self, model: LlamaForCausalLM, pool: KVCachePool, max_batch: int, max_model_len: int) -> None:
        self.model, self.pool = model, pool
        device = pool.tensor.device
        self.buckets = [b for b in BATCH_BUCKETS if b <= max_batch] or [max_batch]
        n = self.buckets[-1]
        self.max_blocks = -(-max_model_len // pool.spec.block_size)
        self.max_model_len = max_model_len
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), pool.scratch_slot, dtype=torch.int64, device=device)
        self.seqused = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.full((n, self.max_blocks), pool.scratch_block, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.slots[:b], decode=None, segments=(), num_tokens=b)
        flash = FlashMetadata(self.cu_seqlens[: b + 1], self.seqused[:b], self.tables[:b], 1, self.max_model_len)
        attn = FlashAttention(self.pool, AttentionShape.of(self.model.config), meta, flash)
        return self.model(self.input_ids[:b], self.positions[:b], attn)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        mempool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            self._forward(b)  # warm-up outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = graph

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (not meta.segments and not meta.groups and meta.decode is not None  # (one block table per step)
                and meta.num_tokens <= self.buckets[-1]
                and meta.decode.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        assert meta.decode is not None
        n = meta.num_tokens
        b = next(size for size in self.buckets if size >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slots.fill_(self.pool.scratch_slot)
        self.slots[:n] = meta.slot_mapping
        self.seqused.fill_(1)
        self.seqused[:n] = meta.decode.context_lens
        self.tables.fill_(self.pool.scratch_block)
        width = meta.decode.block_tables.shape[1]
        self.tables[:n, :width] = meta.decode.block_tables
        self.graphs[b].replay()
        return self.outputs[b][:n]
