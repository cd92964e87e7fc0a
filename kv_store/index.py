"""Where each block lives in a KV store's memory, and when it may be read (the store's own bookkeeping; the
bytes are in its transfer segment, at `slot * block_bytes`).

A slot is free, reserved (a writer was given it and has not committed), or readable. Invariants:
- a block is readable only after a commit whose checksum matched the store's own bytes of its slot;
- a reserved slot is handed to no one else until its reservation is committed, abandoned or lapses;
- a readable block is not evicted while a read lease (granted by `lookup`) runs, so a reader that read
  within its lease read a block nobody overwrote (the reader checks the checksum anyway);
- one hash has at most one entry: a second put of it is left out at `reserve` (puts are idempotent);
- a slot whose write did not end in a good commit (abandoned, checksum mismatch, lapsed) is reused only after
  `reserve_ttl_s` more: a write the transfer engine accepted may still land, and must not land in another block.
The index lives only in the store process's memory, as its data does: a restarted store starts empty.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

EVENT_LOG_LENGTH = 1 << 16  # changes kept for `changes_since`; a reader further behind gets a snapshot


class NamespaceError(ValueError):
    """The request's namespace (weights and KV layout) or block size is not the store's."""


@dataclass
class _Entry:
    slot: int
    token_ids: tuple[int, ...]
    reservation: str | None  # the writer's reservation tag while reserved; None once readable
    expires: float  # reserved: when the reservation lapses; readable: when the last read lease ends
    checksum: int = 0


@dataclass(frozen=True)
class Hit:
    block_hash: int
    offset: int
    checksum: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class IndexStats:
    namespace: str
    block_bytes: int
    capacity_blocks: int
    readable_blocks: int
    reserved_blocks: int
    lookups: int
    hits: int
    committed: int
    rejected: int
    evicted: int
    lapsed: int
    dropped: int


class StoreIndex:
    """Slots of one namespace in `capacity_bytes` of memory; the namespace and block size are fixed by the first
    `reserve` (`bind`). Thread-safe."""

    def __init__(self, capacity_bytes: int, reserve_ttl_s: float = 10.0, read_lease_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_bytes <= 0 or reserve_ttl_s <= 0 or read_lease_s <= 0:
            raise ValueError("capacity, reservation TTL and read lease must be positive")
        self.capacity_bytes = capacity_bytes
        self.reserve_ttl_s = reserve_ttl_s
        self.read_lease_s = read_lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self.namespace = ""
        self.block_bytes = 0
        self.capacity_blocks = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # hash → entry; readable ones in LRU order
        self._free: list[int] = []
        self._quarantine: list[tuple[float, int]] = []  # a heap of (reusable after, slot)
        self._lookups = self._hits = self._committed = self._rejected = self._evicted = self._lapsed = 0
        self._dropped = 0
        self._version = 0  # changes of the readable set so far
        # (version, hash, readable now) of the latest changes, oldest first; trimmed to EVENT_LOG_LENGTH in bulk
        self._log: list[tuple[int, int, bool]] = []

    def bind(self, namespace: str, block_bytes: int) -> None:
        """Fix the namespace and block size (first call), or check them (later calls)."""
        with self._lock:
            self._bind(namespace, block_bytes)

    def _bind(self, namespace: str, block_bytes: int) -> None:
        if not namespace or block_bytes <= 0:
            raise NamespaceError("a namespace and a positive block size are required")
        if not self.namespace:
            if block_bytes > self.capacity_bytes:
                raise NamespaceError(f"a block of {block_bytes} bytes does not fit in {self.capacity_bytes}")
            self.namespace, self.block_bytes = namespace, block_bytes
            self.capacity_blocks = self.capacity_bytes // block_bytes
            self._free = list(range(self.capacity_blocks - 1, -1, -1))
        elif (namespace, block_bytes) != (self.namespace, self.block_bytes):
            raise NamespaceError(f"this store serves namespace {self.namespace} ({self.block_bytes}-byte blocks), "
                                 f"not {namespace} ({block_bytes}-byte blocks): run one store per model")

    def _check(self, namespace: str) -> None:
        if namespace != self.namespace:
            raise NamespaceError(f"this store serves namespace {self.namespace or '(none yet)'}, not {namespace}")

    def lookup(self, namespace: str, hashes: Sequence[int]) -> list[Hit]:
        """The readable blocks among `hashes`, in their order; each is leased for `read_lease_s`."""
        with self._lock:
            self._lookups += len(hashes)
            if namespace != self.namespace:
                return []  # nothing of it is here (an empty store has no namespace yet)
            until = self._clock() + self.read_lease_s
            hits = []
            for block_hash in hashes:
                entry = self._entries.get(block_hash)
                if entry is None or entry.reservation is not None:
                    continue
                entry.expires = max(entry.expires, until)
                self._entries.move_to_end(block_hash)
                hits.append(Hit(block_hash, entry.slot * self.block_bytes, entry.checksum, entry.token_ids))
            self._hits += len(hits)
            return hits

    def reserve(self, namespace: str, block_bytes: int, blocks: Sequence[tuple[int, tuple[int, ...]]],
                tag: str) -> list[tuple[int, int]]:
        """(hash, offset) of the blocks given room under reservation `tag`: those neither held nor being written,
        while free or evictable slots last."""
        with self._lock:
            self._bind(namespace, block_bytes)
            now = self._clock()
            reserved = []
            for block_hash, token_ids in blocks:
                if block_hash in self._entries:
                    continue
                slot = self._take_slot(now)
                if slot is None:
                    break
                self._entries[block_hash] = _Entry(slot, token_ids, tag, now + self.reserve_ttl_s)
                reserved.append((block_hash, slot * self.block_bytes))
            return reserved

    def reserved(self, namespace: str, tag: str, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """(hash, offset) of those of `hashes` still reserved under `tag` (to verify before `commit`)."""
        with self._lock:
            self._check(namespace)
            return [(h, e.slot * self.block_bytes) for h in hashes
                    if (e := self._entries.get(h)) is not None and e.reservation == tag]

    def commit(self, tag: str, verdicts: Sequence[tuple[int, bool, int]]) -> tuple[int, int]:
        """Apply (hash, written and its checksum matched the slot's bytes, checksum) for blocks reserved under
        `tag`: readable, or freed. Blocks whose reservation lapsed or is another's count as rejected.
        Returns (accepted, rejected)."""
        accepted = rejected = 0
        with self._lock:
            for block_hash, good, checksum in verdicts:
                entry = self._entries.get(block_hash)
                if entry is None or entry.reservation != tag:
                    rejected += 1
                    continue
                if not good:
                    del self._entries[block_hash]
                    self._quarantine_slot(entry.slot)
                    rejected += 1
                    continue
                entry.reservation, entry.checksum, entry.expires = None, checksum, 0.0
                self._entries.move_to_end(block_hash)
                self._changed(block_hash, readable=True)
                accepted += 1
            self._committed += accepted
            self._rejected += rejected
        return accepted, rejected

    def abandon(self, namespace: str, tag: str, hashes: Sequence[int]) -> None:
        """Free the slots of blocks reserved under `tag` that will not be written."""
        with self._lock:
            self._check(namespace)
            for block_hash in hashes:
                entry = self._entries.get(block_hash)
                if entry is not None and entry.reservation == tag:
                    del self._entries[block_hash]
                    self._quarantine_slot(entry.slot)

    def expire(self) -> int:
        """Free the slots of lapsed reservations; returns how many."""
        with self._lock:
            now = self._clock()
            lapsed = [h for h, e in self._entries.items() if e.reservation is not None and e.expires <= now]
            for block_hash in lapsed:
                self._quarantine_slot(self._entries.pop(block_hash).slot)
            self._lapsed += len(lapsed)
            return len(lapsed)

    def _take_slot(self, now: float) -> int | None:
        """A free slot, or the least recently used readable block's, unless it is leased (lock held)."""
        if self._quarantine and self._quarantine[0][0] <= now:
            return heapq.heappop(self._quarantine)[1]
        if self._free:
            return self._free.pop()
        victim = next((h for h, e in self._entries.items() if e.reservation is None and e.expires <= now), None)
        if victim is None:
            return None
        self._evicted += 1
        self._changed(victim, readable=False)
        return self._entries.pop(victim).slot

    def _quarantine_slot(self, slot: int) -> None:
        heapq.heappush(self._quarantine, (self._clock() + self.reserve_ttl_s, slot))

    def _changed(self, block_hash: int, readable: bool) -> None:
        self._version += 1
        self._log.append((self._version, block_hash, readable))
        if len(self._log) > 2 * EVENT_LOG_LENGTH:
            del self._log[:-EVENT_LOG_LENGTH]

    def drop_unless(self, namespace: str, hashes: Sequence[int], intact: Callable[[int, int], bool]) -> int:
        """Drop the readable blocks among `hashes` for which `intact(offset, checksum)` is False (a reader found
        them corrupt; `intact` checks the store's own bytes). It runs without the lock (a checksum of many blocks
        takes long); a block is dropped only if its entry is still the one checked (a readable slot is written by
        no one while its entry stands)."""
        with self._lock:
            self._check(namespace)
            candidates = [(h, e) for h in hashes if (e := self._entries.get(h)) is not None and e.reservation is None]
        failed = [(h, e) for h, e in candidates if not intact(e.slot * self.block_bytes, e.checksum)]
        with self._lock:
            dropped = 0
            for block_hash, entry in failed:
                if self._entries.get(block_hash) is entry and entry.reservation is None:
                    del self._entries[block_hash]
                    self._changed(block_hash, readable=False)
                    self._quarantine_slot(entry.slot)
                    dropped += 1
            self._dropped += dropped
            return dropped

    def snapshot(self) -> tuple[int, list[int]]:
        """(version, every readable hash): `changes_since(version)` follows on from it."""
        with self._lock:
            return self._version, [h for h, e in self._entries.items() if e.reservation is None]

    def changes_since(self, version: int) -> tuple[int, list[int], list[int]] | None:
        """(version now, hashes that became readable, hashes that left) since `version`, applied in that order
        (exact whatever the order of the changes); None when the log no longer reaches back that far."""
        with self._lock:
            if self._version == version:
                return version, [], []
            if not self._log or self._log[0][0] > version + 1 or version > self._version:
                return None
            final: dict[int, bool] = {}
            for _, block_hash, readable in self._log[version + 1 - self._log[0][0]:]:  # versions are consecutive
                final[block_hash] = readable
            return (self._version, [h for h, r in final.items() if r], [h for h, r in final.items() if not r])

    def stats(self) -> IndexStats:
        with self._lock:
            reserved = sum(e.reservation is not None for e in self._entries.values())
            return IndexStats(self.namespace, self.block_bytes, self.capacity_blocks, len(self._entries) - reserved,
                              reserved, self._lookups, self._hits, self._committed, self._rejected, self._evicted,
                              self._lapsed, self._dropped)

    def check_integrity(self) -> None:
        """Raise AssertionError unless every slot is free or held by exactly one entry."""
        with self._lock:
            held = [e.slot for e in self._entries.values()]
            idle = self._free + [slot for _, slot in self._quarantine]
            if len(set(held)) != len(held) or len(set(idle)) != len(idle) or set(held) & set(idle) or \
                    len(held) + len(idle) != self.capacity_blocks:
                raise AssertionError(f"KV store index: {len(held)} held, {len(self._free)} free and "
                                     f"{len(self._quarantine)} quarantined slots of {self.capacity_blocks}, some "
                                     "shared or lost")
