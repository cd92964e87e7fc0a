"""The second KV tier on a tensor-parallel rank past 0: rank 0's tier (engine.kv_offload) decides what is kept
where; this rank keeps its own KV heads of the same blocks in the same slots, making the copies rank 0 made.

Rank 0 logs each copy as it decides it (`TierCopy`: a block stored into a slot when the pool frees it, a slot
loaded into a block on a prefix hit) and sends the log with its next message to the ranks (FollowerStep.tier_copies,
RankCommand.tier_copies); the rank makes them, in order, before that step's forward or that command. The order keeps
the tier's invariants here: a block is stored before anything writes it again (rank 0 decided the store when the
block was freed, before handing it out again; what writes a block is a step, or a peer granted it by a command),
and a slot is loaded before a later store overwrites it. A store rank 0 dropped (its tier cleared) is made anyway:
its slot holds nothing readable until a later store into it, which comes after it in the log."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from engine.kv_cache import KVCachePool
from engine.kv_offload_memory import mapped_file, pinned_host, unpin


class TierCopy(NamedTuple):
    store: bool  # True: pool block -> slot; False: slot -> pool block
    block_id: int
    slot: int


class TierMirror:
    def __init__(self, pool: KVCachePool, capacity_blocks: int, directory: str | None = None) -> None:
        self._pool_rows = pool.byte_rows()  # [layers, blocks, bytes of one block of one layer]
        layers, _, row_bytes = self._pool_rows.shape
        self._on_gpu = self._pool_rows.device.type == "cuda"
        size = capacity_blocks * layers * row_bytes
        self._flat: torch.Tensor | None = pinned_host(size) if self._on_gpu else mapped_file(directory, size)
        self._slots = self._flat.view(capacity_blocks, layers, row_bytes)
        self.num_copies = 0

    def apply(self, copies: tuple[TierCopy, ...]) -> None:
        """Make rank 0's copies, in order; done when it returns."""
        for copy in copies:
            pool_block, slot = self._pool_rows[:, copy.block_id], self._slots[copy.slot]
            dst, src = (slot, pool_block) if copy.store else (pool_block, slot)
            if self._on_gpu:
                dst.copy_(src)
            else:
                np.copyto(dst.numpy(), src.numpy())
        if copies and self._on_gpu:
            torch.cuda.current_stream(self._pool_rows.device).synchronize()
        self.num_copies += len(copies)

    def close(self) -> None:
        if self._on_gpu and self._flat is not None:
            unpin(self._flat)
        self._flat = None
