"""The second KV tier of a worker: cached blocks leaving the pool are kept in a larger, slower store and
loaded back on a prefix hit instead of being recomputed (vLLM's CPU offloading, SGLang's HiCache).

The store is a memory-mapped file on local disk for a CPU pool (its pages live in the page cache; the kernel
writes them back as memory runs short), pinned host memory for a GPU pool. It holds whole blocks, every layer
of one block in one slot, under the same content hash as in the pool (engine.block_manager), with its own LRU.

When a cached block becomes free in the pool, its copy into the tier is queued and a writer thread makes it,
off the engine's step; before the pool reuses that block, the engine thread finishes the copy (or makes it
itself if the writer has not started it). A prefix hit is staged at admission and copied into the pool by
`run_staged`, which the engine calls while no forward runs. Invariants:
- an entry is readable only once its copy is complete (`pending` is None); a slot is written by one copy at a time;
- readable entries are removed only on the engine thread (`freed` or `hold_for_load` evicting for room, `clear`),
  never while staged, so the entries that `match` returns stay in place until `run_staged` has copied them
  (`finish_load`, on any thread, removes only unreadable fetch entries, which `match` never returns);
- a slot is reused only when nothing outside the engine may still read it (a pinned export: its pins end, even
  across `clear`) or write it (a failed fetch: after its quarantine);
- a block is copied in only after the forward that wrote it has ended on the device too (the engine waits for
  the device after each forward when the tier is on a GPU);
- a block's tokens are kept with its hash and compared on lookup, as in the pool (no collision is trusted).
"""

from __future__ import annotations

import heapq
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import EngineConfig
from engine.errors import PoolIntegrityError
from engine.kv_cache import KVCachePool
from engine.kv_offload_memory import mapped_file, pinned_host, unpin
from engine.kv_offload_mirror import TierCopy
from engine.outputs import OffloadStats


@dataclass
class _Write:
    """One block's copy into the tier; run once, by the writer thread or the engine thread, whichever first."""

    block_id: int
    block_hash: int
    slot: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False


@dataclass
class _Fetch:
    """A block being written into its slot from outside the worker (the cluster KV store): `hold_for_load`
    made it, `finish_load` ends it."""

    discard: bool = False  # `clear` ran meanwhile: drop it when it ends


@dataclass
class _Entry:
    slot: int
    token_ids: tuple[int, ...]
    pending: _Write | _Fetch | None  # what fills the slot; None once it is complete (the entry is readable)
    staged: int = 0  # loads into the pool staged and not yet run: the entry is not evicted meanwhile
    pinned: int = 0  # readers outside the engine (exports to the cluster KV store): not evicted meanwhile


def offload_capacity(config: EngineConfig, pool: KVCachePool) -> int:
    """The tier's slots: as many of the pool's blocks as config.kv_offload_bytes holds (every rank of a
    tensor-parallel group gets as many: its pool's blocks hold as many KV heads as any other rank's)."""
    capacity = config.kv_offload_bytes // pool.spec.bytes_per_block
    if capacity < 1:
        raise ValueError(f"kv_offload_bytes ({config.kv_offload_bytes}) holds no KV block "
                         f"({pool.spec.bytes_per_block} bytes each)")
    return capacity


class KVOffloadTier:
    """`capacity_blocks` slots of `pool.spec.bytes_per_block` bytes; implements engine.block_manager.OffloadTier."""

    def __init__(self, pool: KVCachePool, capacity_blocks: int, directory: str | None = None,
                 background_writes: bool = True) -> None:
        """`background_writes=False` (tests): copies are made only when the pool reuses a block or on `flush`."""
        if capacity_blocks < 1:
            raise ValueError(f"a KV offload tier needs >= 1 block, got {capacity_blocks}")
        self._pool_rows = pool.byte_rows()  # [layers, blocks, bytes of one block of one layer]
        layers, _, row_bytes = self._pool_rows.shape
        self._block_size = pool.spec.block_size
        self.capacity_blocks = capacity_blocks
        self.block_bytes = layers * row_bytes
        self._on_gpu = self._pool_rows.device.type == "cuda"
        # GPU: copies into the tier run on a stream of their own, so they do not queue behind the forward
        self._stream = torch.cuda.Stream(self._pool_rows.device) if self._on_gpu else None
        self._pinned: torch.Tensor | None = None
        if self._on_gpu:
            flat = self._pinned = pinned_host(capacity_blocks * self.block_bytes)
        else:
            flat = mapped_file(directory, capacity_blocks * self.block_bytes)
        self._slots = flat.view(capacity_blocks, layers, row_bytes)
        self._lock = threading.Lock()  # guards the index, the free slots, the pending writes and the counters
        self._index: OrderedDict[int, _Entry] = OrderedDict()  # hash → entry, least recently used first
        self._free_slots = list(range(capacity_blocks - 1, -1, -1))
        self._pending: dict[int, _Write] = {}  # pool block id → its copy not yet finished
        self._staged: list[tuple[int, int]] = []  # (hash, pool block id) of loads not yet run (engine thread only)
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        # the cluster KV store's side (worker_runtime.kv_store_client): blocks made readable by a copy from the
        # pool, to export; slots of fetches that failed, kept from reuse until a late write can no longer land
        self.collect_exports = False
        self._exports: deque[int] = deque(maxlen=capacity_blocks)  # a backlog past the tier's size is stale anyway
        self._quarantine: list[tuple[float, int]] = []  # a heap of (free after, slot)
        self._orphans: dict[int, int] = {}  # slot → pins left, of pinned entries `clear` dropped: freed at 0
        # fetches are refused while this many slots are quarantined: a store whose reads keep failing must not
        # push the tier's own blocks out, each fetch evicting some and then keeping their slots from use
        self.max_quarantined = capacity_blocks // 2
        self._queried = self._stored = self._loaded = self._evicted = self._dropped = 0
        self._finished_on_reuse = 0
        self._store_s = self._load_s = 0.0
        # KV events (for KV-aware routing): hashes that became readable here and that left, since the last drain
        self.record_events = False
        self.on_events: Callable[[], None] | None = None  # called (any thread) after a change is recorded
        self._events_stored: set[int] = set()
        self._events_removed: set[int] = set()
        # a tensor-parallel engine's: each copy decided, in order, for the other ranks' tiers (engine.kv_offload_mirror)
        self.copies: list[TierCopy] | None = None
        self._probe_load_s = self._measure_load(pool.scratch_block)
        self._writer: threading.Thread | None = None
        if background_writes:
            self._writer = threading.Thread(target=self._write_loop, name="tandem-kv-offload", daemon=True)
            self._writer.start()

    # -- the pool's side (engine thread) ----------------------------------------------------------------
    def freed(self, block_id: int, block_hash: int, token_ids: tuple[int, ...]) -> None:
        with self._lock:
            entry = self._index.get(block_hash)
            if entry is not None:  # already here (or on its way): same hash, same KV
                self._index.move_to_end(block_hash)
                return
            slot = self._take_slot()
            if slot is None:
                self._dropped += 1
                return
            write = _Write(block_id, block_hash, slot)
            self._index[block_hash] = _Entry(slot, token_ids, write)
            self._pending[block_id] = write
            if self.copies is not None:
                self.copies.append(TierCopy(True, block_id, slot))
        if self._writer is not None:
            self._queue.put(write)

    def reusing(self, block_id: int) -> None:
        with self._lock:
            write = self._pending.get(block_id)
        if write is not None:
            self._run(write, on_reuse=True)

    # -- prefix hits (engine thread) --------------------------------------------------------------------
    def match(self, block_hashes: Sequence[int], token_ids: Sequence[int], first_block: int,
              touch: bool = True) -> list[int]:
        """The longest run of `block_hashes` (blocks `first_block`, `first_block` + 1, ... of `token_ids`) that
        is readable here. Counts nothing (a request not admitted is matched again at the next step); `touch`:
        they become the most recently used."""
        size = self._block_size
        found: list[int] = []
        with self._lock:
            for block, block_hash in enumerate(block_hashes, start=first_block):
                entry = self._index.get(block_hash)
                if (entry is None or entry.pending is not None
                        or entry.token_ids != tuple(token_ids[block * size:(block + 1) * size])):
                    break
                if touch:
                    self._index.move_to_end(block_hash)
                found.append(block_hash)
        return found

    def stage(self, block_hashes: Sequence[int], block_ids: Sequence[int], num_looked_up: int) -> None:
        """Hold the entries `match` returned, to be copied into pool blocks `block_ids` (same order) by
        `run_staged`; `num_looked_up`: blocks of the request the pool lacked (for the hit rate)."""
        with self._lock:
            for block_hash, block_id in zip(block_hashes, block_ids, strict=True):
                self._index[block_hash].staged += 1
                self._staged.append((block_hash, block_id))
            self._queried += num_looked_up

    def run_staged(self) -> None:
        """Copy every staged entry into its pool block; done when it returns. The engine calls it while no forward
        runs (a forward in flight may still write a block that was freed and handed out again)."""
        if not self._staged:
            return
        started = time.perf_counter()
        staged, self._staged = self._staged, []
        with self._lock:
            slots = [self._index[block_hash].slot for block_hash, _ in staged]
            if self.copies is not None:
                self.copies.extend(TierCopy(False, block_id, slot) for slot, (_, block_id) in zip(slots, staged,
                                                                                                 strict=True))
        try:
            for slot, (_, block_id) in zip(slots, staged, strict=True):
                self._copy(self._pool_rows[:, block_id], self._slots[slot])
            if self._on_gpu:
                torch.cuda.current_stream(self._pool_rows.device).synchronize()  # timed to the end of the copies
        finally:  # a copy that failed fails the step; the entries are evictable again either way
            with self._lock:
                for block_hash, _ in staged:
                    self._index[block_hash].staged -= 1
        with self._lock:
            self._loaded += len(staged)
            self._load_s += time.perf_counter() - started

    # -- housekeeping -----------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every entry (a prefix-cache reset); copies under way finish first. Nothing may be staged."""
        if self._staged:
            raise RuntimeError("the KV offload tier still has staged loads: run them before clearing it")
        with self._lock:
            writes = list(self._pending.values())
        for write in writes:
            with write.lock:
                write.done = True  # one not started is dropped
        with self._lock:
            for block_hash, entry in self._index.items():
                if entry.pending is None:
                    self._record_removed(block_hash)
            fetching = {h: e for h, e in self._index.items() if isinstance(e.pending, _Fetch)}
            for entry in fetching.values():  # their slots are written from outside: freed when the fetch ends
                assert isinstance(entry.pending, _Fetch)
                entry.pending.discard = True
            for entry in self._index.values():  # read by an export still: its slot is freed when unpinned
                if entry.pinned:
                    self._orphans[entry.slot] = self._orphans.get(entry.slot, 0) + entry.pinned
            held = ({e.slot for e in fetching.values()} | {slot for _, slot in self._quarantine}
                    | set(self._orphans))
            self._events_stored.clear()
            self._exports.clear()
            self._pending.clear()
            self._index = OrderedDict(fetching)
            self._free_slots = [s for s in range(self.capacity_blocks - 1, -1, -1) if s not in held]

    def take_copies(self) -> tuple[TierCopy, ...]:
        """The copies decided since the last call, in order (for the other ranks: the tier_copies of the next message
        rank 0 sends them, a FollowerStep's or a RankCommand's)."""
        with self._lock:
            if not self.copies:
                return ()
            taken, self.copies = tuple(self.copies), []
        return taken

    def flush(self) -> None:
        """Make every queued copy now, on this thread."""
        with self._lock:
            writes = list(self._pending.values())
        for write in writes:
            self._run(write, on_reuse=False)

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10)
            self._writer = None
        if self._pinned is not None:
            unpin(self._pinned)
            self._pinned = None

    def stats(self) -> OffloadStats:
        with self._lock:
            return OffloadStats(self.capacity_blocks, len(self._index), self.block_bytes, self._queried, self._loaded,
                                self._load_s, self._stored, self._store_s, self._evicted,
                                self._dropped, self._finished_on_reuse)

    def check_integrity(self) -> None:
        """Raise PoolIntegrityError unless every slot is either free or held by exactly one entry, every pending
        copy fills its entry's slot, and the staged loads are those the entries count (engine thread; read under
        the lock: the writer thread changes nothing halfway)."""
        with self._lock:
            held = [e.slot for e in self._index.values()]
            problems = [why for why, bad in (
                ("two entries share a slot", len(set(held)) != len(held)),
                ("a slot is both free and held", bool(set(held) & set(self._free_slots))),
                ("a slot is lost", len(held) + len(self._free_slots) + len(self._quarantine) + len(self._orphans)
                 != self.capacity_blocks),
                ("a quarantined or orphaned slot is also free or held",
                 bool(({s for _, s in self._quarantine} | set(self._orphans)) & (set(held) | set(self._free_slots)))),
                ("a pending copy lost its entry", any(self._index.get(w.block_hash) is None
                                                      or self._index[w.block_hash].pending is not w
                                                      for w in self._pending.values())),
                ("staged loads and their entries disagree",
                 any(h not in self._index for h, _ in self._staged)
                 or sum(e.staged for e in self._index.values()) != len(self._staged)),
            ) if bad]
        if problems:
            raise PoolIntegrityError(f"KV offload tier: {'; '.join(problems)}")

    # -- internals --------------------------------------------------------------------------------------
    def _take_slot(self) -> int | None:
        """A free slot, evicting the least recently used readable entry if none is (lock held)."""
        if self._quarantine and self._quarantine[0][0] <= time.monotonic():
            return heapq.heappop(self._quarantine)[1]
        if self._free_slots:
            return self._free_slots.pop()
        victim = next((h for h, e in self._index.items() if e.pending is None and not e.staged and not e.pinned),
                      None)
        if victim is None:
            return None
        self._evicted += 1
        self._record_removed(victim)
        return self._index.pop(victim).slot

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """On a CPU a blocking copy through NumPy: one thread, no OpenMP team beside the forward's, GIL released.
        On a GPU queued on the current stream: a load (the engine's stream) is ordered before the next forward; a
        store runs on the tier's stream (`_write`), which it synchronizes."""
        if self._on_gpu:
            dst.copy_(src, non_blocking=True)
        else:
            np.copyto(dst.numpy(), src.numpy())

    def _write(self, slot: int, block_id: int) -> None:
        """Copy pool block `block_id` into `slot`; done when it returns. The block's KV was written by a forward
        that has ended, on the device too (a block is registered, and so cached, only once its step is committed,
        and the engine waits for the device after a forward when the tier is on a GPU: this stream does not)."""
        if self._stream is None:
            self._copy(self._slots[slot], self._pool_rows[:, block_id])
            return
        with torch.cuda.stream(self._stream):
            self._copy(self._slots[slot], self._pool_rows[:, block_id])
        self._stream.synchronize()

    def _write_loop(self) -> None:
        while (write := self._queue.get()) is not None:
            self._run(write, on_reuse=False)

    def _run(self, write: _Write, on_reuse: bool) -> None:
        with write.lock:
            if write.done:
                return
            started = time.perf_counter()
            self._write(write.slot, write.block_id)
            write.done = True
            elapsed = time.perf_counter() - started
        with self._lock:
            if self._pending.get(write.block_id) is write:
                del self._pending[write.block_id]
            entry = self._index.get(write.block_hash)
            became_readable = entry is not None and entry.pending is write
            if entry is not None and became_readable:
                entry.pending = None
                if self.collect_exports:
                    self._exports.append(write.block_hash)
                if self.record_events:
                    self._events_removed.discard(write.block_hash)
                    self._events_stored.add(write.block_hash)
            self._stored += 1
            self._store_s += elapsed
            self._finished_on_reuse += on_reuse
        if became_readable and self.record_events and self.on_events is not None:
            self.on_events()

    # -- the cluster KV store's side ---------------------------------------------------------------------
    @property
    def memory(self) -> torch.Tensor:
        """The tier's bytes, flat (slot i at `i * block_bytes`): a transfer segment for the cluster KV store."""
        return self._slots.view(-1)

    def take_exports(self, limit: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """Up to `limit` (hash, slot, tokens) of blocks copied in from the pool since the last call and still
        readable, each pinned (not evicted, so its slot is not rewritten) until `unpin` (any thread)."""
        with self._lock:
            exports = []
            for _ in range(min(limit, len(self._exports))):
                block_hash = self._exports.popleft()
                entry = self._index.get(block_hash)
                if entry is not None and entry.pending is None:
                    entry.pinned += 1
                    exports.append((block_hash, entry.slot, entry.token_ids))
            return exports

    def unpin(self, exports: Sequence[tuple[int, int]]) -> None:
        """End the pins of (hash, slot) pairs `take_exports` returned."""
        with self._lock:
            for block_hash, slot in exports:
                entry = self._index.get(block_hash)
                if entry is not None and entry.slot == slot and entry.pinned:
                    entry.pinned -= 1
                elif slot in self._orphans:  # dropped by `clear` while pinned
                    self._orphans[slot] -= 1
                    if not self._orphans[slot]:
                        del self._orphans[slot]
                        self._free_slots.append(slot)

    def hold_for_load(self, blocks: Sequence[tuple[int, tuple[int, ...]]]) -> list[int]:
        """Slots for (hash, tokens) blocks fetched from outside, in order, stopping at the first that is already
        here or finds no room (evicting as `freed` does, hence engine thread only). Each stays unreadable until
        `finish_load`."""
        slots: list[int] = []
        with self._lock:
            if len(self._quarantine) >= self.max_quarantined:
                return slots
            for block_hash, token_ids in blocks:
                if block_hash in self._index:
                    break
                slot = self._take_slot()
                if slot is None:
                    break
                self._index[block_hash] = _Entry(slot, token_ids, _Fetch())
                slots.append(slot)
        return slots

    def finish_load(self, block_hashes: Sequence[int], landed: Sequence[bool], quarantine_s: float = 30.0) -> None:
        """End the fetches `hold_for_load` started (any thread): a landed block becomes readable; the slot of one
        that did not is kept from reuse for `quarantine_s` (a write may still be under way)."""
        until = time.monotonic() + quarantine_s
        with self._lock:
            for block_hash, ok in zip(block_hashes, landed, strict=True):
                entry = self._index.get(block_hash)
                if entry is None or not isinstance(entry.pending, _Fetch):
                    continue
                if ok and not entry.pending.discard:
                    entry.pending = None
                    self._index.move_to_end(block_hash)
                    if self.record_events:
                        self._events_removed.discard(block_hash)
                        self._events_stored.add(block_hash)
                    continue
                del self._index[block_hash]
                if ok:
                    self._free_slots.append(entry.slot)
                else:
                    heapq.heappush(self._quarantine, (until, entry.slot))
        if self.record_events and self.on_events is not None and any(landed):
            self.on_events()

    # -- KV events and costs ----------------------------------------------------------------------------
    @property
    def has_events(self) -> bool:
        return bool(self._events_stored or self._events_removed)

    def drain_events(self, with_snapshot: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
        """(became readable, left, every readable hash when `with_snapshot`) since the last drain. Apply the
        first, then the second: exact whatever the order of the changes."""
        with self._lock:
            stored, removed = tuple(self._events_stored), tuple(self._events_removed)
            self._events_stored.clear()
            self._events_removed.clear()
            snapshot = tuple(h for h, e in self._index.items() if e.pending is None) if with_snapshot else None
        return stored, removed, snapshot

    def load_seconds_per_block(self) -> float:
        """Measured: the mean of the loads so far, or the start-up probe's before any."""
        with self._lock:
            return self._load_s / self._loaded if self._loaded else self._probe_load_s

    def _measure_load(self, scratch_block: int, repeats: int = 3) -> float:
        """Seconds to load one block into the pool, timed on the pool's scratch block (never handed out)."""
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            self._copy(self._pool_rows[:, scratch_block], self._slots[0])
            if self._on_gpu:
                torch.cuda.current_stream(self._pool_rows.device).synchronize()
            best = min(best, time.perf_counter() - started)
        # the scratch block stands for given-back blocks in block tables (engine.scheduler), read under a mask:
        # it must hold finite values, not whatever the tier slot held
        self._pool_rows[:, scratch_block].zero_()
        return best

    def _record_removed(self, block_hash: int) -> None:
        """(lock held) `block_hash` leaves the tier; a readable entry was reported as stored."""
        if self.record_events:
            self._events_removed.add(block_hash)
