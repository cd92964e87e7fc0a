"""KV block allocation with automatic prefix caching.

A full block is identified by a chained hash of its tokens and of the hash of the block before
it, so equal hashes mean equal whole prefixes. Hashes are blake2b over little-endian int64s:
deterministic across processes and machines (no per-process seed), so the router, prefill and
decode workers agree on them. A sequence's first block chains from its cache salt's root
(`salted_root`): sequences under different salts (tenants) share no block.

Invariants (checked by `check_integrity`, which raises PoolIntegrityError):
- every block is either free (ref_count 0, in the LRU free list) or used (ref_count > 0, not free);
- `cached` maps a hash to the block holding it, and that block's `hash` is that key;
- free blocks keep their hash (and stay findable) until they are reused: eviction is LRU.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.errors import PoolIntegrityError

ROOT_HASH = 0  # the parent of an unsalted sequence's first block
MAX_CACHE_SALT_CHARS = 4096


def salted_root(cache_salt: str) -> int:
    """The parent hash of the first block of a sequence with this cache salt (ROOT_HASH for none)."""
    if not cache_salt:
        return ROOT_HASH
    digest = hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"), digest_size=8, person=b"tandem-salt")
    return int.from_bytes(digest.digest(), "little", signed=True)


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    digest = hashlib.blake2b(struct.pack("<q", parent_hash), digest_size=8)
    digest.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


def _group_salt(group: int) -> int:
    digest = hashlib.blake2b(struct.pack("<q", group), digest_size=8, person=b"tandem-group")
    return int.from_bytes(digest.digest(), "little", signed=True)


_GROUP_SALTS = [_group_salt(g) for g in range(64)]  # (engine.kv_groups.MAX_GROUPS, and then some)


def group_key(block_hash: int, group: int) -> int:
    """The prefix-cache key of a block of layer group `group` (engine.kv_groups) holding the block `block_hash`
    names: the hash itself for group 0 (what KV events publish), a salted one for the others (cheap: it is taken
    of every block of a waiting prompt at each admission attempt; a key is trusted only with its tokens)."""
    return block_hash if group == 0 else block_hash ^ _GROUP_SALTS[group]


def group_keys(block_hashes: Sequence[int], group: int) -> list[int]:
    return list(block_hashes) if group == 0 else [group_key(h, group) for h in block_hashes]


def blocks_behind(next_position: int, window: int, block_size: int) -> int:
    """How many leading blocks no query at `next_position` or later reads through a window of `window` positions
    (its own included; 0: no window, every block is read)."""
    return max(next_position - window + 1, 0) // block_size if window else 0


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start:start + block_size])
        hashes.append(parent_hash)
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())  # kept with the hash to rule out collisions
    published: bool = False  # its hash goes out in KV events (group 0's blocks only: engine.kv_groups)


@dataclass(frozen=True)
class KVCacheEvents:
    """Changes to the set of cached block hashes since the previous drain (for KV-aware routing).
    Apply `stored`, then `removed`: the result is exact whatever the order of the changes was (a
    hash evicted and cached again within one drain is only in `stored`)."""

    stored: tuple[int, ...]
    removed: tuple[int, ...]
    snapshot: tuple[int, ...] | None = None  # every cached hash as of the drain, when asked for
    # the second tier's (engine.kv_offload), in the same way: readable there, left it, every readable hash
    offloaded: tuple[int, ...] = ()
    unoffloaded: tuple[int, ...] = ()
    offload_snapshot: tuple[int, ...] | None = None
    offload_block_cost: float = 0.0  # loading one block from the tier, in blocks of prefill work (0: unknown)


class OffloadTier(Protocol):
    """A second KV tier behind the pool (engine.kv_offload): it is told when a cached block becomes free (it may
    copy the block's KV out, off the engine thread) and before a cached block is reused (the copy must be done
    or dropped by the time this returns: the block's slots are written next). Prefix hits in it are staged at
    admission and copied into the pool by `run_staged`, which the engine calls while no forward runs."""

    def freed(self, block_id: int, block_hash: int, token_ids: tuple[int, ...]) -> None: ...

    def reusing(self, block_id: int) -> None: ...

    def match(self, block_hashes: Sequence[int], token_ids: Sequence[int], first_block: int,
              touch: bool = True) -> list[int]:
        """The longest readable run of `block_hashes`, which are blocks `first_block`, ... of `token_ids`."""

    def stage(self, block_hashes: Sequence[int], block_ids: Sequence[int], num_looked_up: int) -> None:
        """Hold matched entries for pool blocks `block_ids` until `run_staged` copies them; `num_looked_up`
        blocks were looked for."""


class NoFreeBlocksError(RuntimeError):
    """Internal: the scheduler asked for more blocks than `can_allocate` promised."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}
        self.stats_hit_blocks = 0
        self.stats_queried_blocks = 0
        self.record_events = False  # set by a worker that publishes KV events
        self.offload: OffloadTier | None = None  # set by an engine with a second KV tier
        # a pool block this manager never hands out (the pool's scratch block, whose values stay finite), standing in
        # a sequence's table for a block it gave back before its end: read under a mask by attention, never released
        self.null_block_id = num_blocks
        self._stored: list[int] = []
        self._removed: list[int] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------
    def find_cached_prefix(self, block_hashes: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached prefix among `block_hashes` (not yet referenced)."""
        hits = self.peek_cached_prefix(block_hashes, token_ids)
        self.count_lookup(len(block_hashes), len(hits))
        return hits

    def count_lookup(self, num_queried: int, num_hits: int) -> None:
        """Count one admitted sequence's lookup (a sequence not admitted yet is looked up again)."""
        self.stats_queried_blocks += num_queried
        self.stats_hit_blocks += num_hits

    def peek_cached_prefix(self, block_hashes: Sequence[int], token_ids: Sequence[int]) -> list[int]:
        """`find_cached_prefix` without counting it as a lookup (for routing decisions)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i, h in enumerate(block_hashes):
            block_id = self._cached_block(i, h, token_ids)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _cached_block(self, index: int, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """The cached block holding block `index` of `token_ids` under `block_hash` (its tokens checked), or None."""
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        tokens = tuple(token_ids[index * self.block_size:(index + 1) * self.block_size])
        return block_id if self.blocks[block_id].token_ids == tokens else None

    def peek_cached_window(self, block_hashes: Sequence[int], token_ids: Sequence[int],
                           blocks_behind: Callable[[int], int]) -> list[int | None]:
        """`peek_cached_prefix` for a model whose every layer has a window: the longest run of leading blocks whose
        KV need not be computed, because every block a query at its end reads (from `blocks_behind(end)` on) is
        cached; None for blocks behind that window, cached or not (the hash chain comes from the tokens, so a
        gap there does not matter)."""
        if not self.enable_prefix_caching:
            return []
        present = [self._cached_block(i, h, token_ids) for i, h in enumerate(block_hashes)]
        last_missing = -1  # before block n: the last block not cached
        best = 0
        for n in range(1, len(present) + 1):
            if present[n - 1] is None:
                last_missing = n - 1
            elif last_missing < blocks_behind(n * self.block_size):  # (blocks_behind(n * size) <= n)
                best = n
        first = blocks_behind(best * self.block_size)
        return [None] * first + present[first:best]

    def num_evictable_among(self, block_ids: Iterable[int]) -> int:
        """How many of `block_ids` currently sit in the free list (and so cost a free block to take)."""
        return sum(1 for b in block_ids if b in self.free)

    def take_cached(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each cached block (from `find_cached_prefix`)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1

    def register_full_block(self, block_id: int, block_hash: int, token_ids: Sequence[int],
                            publish: bool = True) -> None:
        """Make a block whose KV is complete findable by its hash (first writer wins); `publish`: its hash goes
        out in KV events (a hybrid layout's further groups' keys do not: engine.block_manager.group_key)."""
        if not self.enable_prefix_caching or block_hash in self.cached:
            return
        block = self.blocks[block_id]
        assert block.hash is None and block.ref_count > 0, "only a fresh, owned block can be registered"
        block.hash = block_hash
        block.token_ids = tuple(token_ids)
        block.published = publish
        self.cached[block_hash] = block_id
        if self.record_events and publish:
            self._stored.append(block_hash)
            if block_hash in self._removed:  # evicted and cached again since the last drain: it is held
                self._removed.remove(block_hash)

    # -- allocation ---------------------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        if count > len(self.free):
            raise NoFreeBlocksError(f"asked for {count} blocks, {len(self.free)} free")
        out = []
        for _ in range(count):
            block_id, _ = self.free.popitem(last=False)  # least recently freed first
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached contents
                if self.offload is not None:
                    self.offload.reusing(block_id)
                self._forget(block)
            block.ref_count = 1
            out.append(block_id)
        return out

    def shortfall(self, tables: Iterable[Sequence[int]], num_blocks: int) -> int:
        """Blocks it takes to make each of `tables` (a sequence's, one per layer group) `num_blocks` long."""
        return sum(max(num_blocks - len(table), 0) for table in tables)

    def extend(self, tables: Iterable[list[int]], num_blocks: int) -> None:
        """Make each of `tables` `num_blocks` long with fresh blocks (NoFreeBlocksError when they run out)."""
        for table in tables:
            if num_blocks > len(table):
                table.extend(self.allocate(num_blocks - len(table)))

    def give_back(self, table: list[int], start: int, end: int) -> None:
        """Release `table[start:end]` and put the null block in their place (a window has left them)."""
        self.release(table[start:end])
        table[start:end] = [self.null_block_id] * (end - start)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 become free (most recent last).

        Blocks are released tail first so that a sequence's later blocks are evicted before its
        earlier ones (a prefix is useless without the blocks before it)."""
        for block_id in reversed(block_ids):
            if block_id == self.null_block_id:  # a table entry whose block was given back early (engine.scheduler)
                continue
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is not None and self.offload is not None:
                    self.offload.freed(block_id, block.hash, block.token_ids)

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.cached.values()):
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._forget(block)

    def _forget(self, block: Block) -> None:
        assert block.hash is not None
        del self.cached[block.hash]
        if self.record_events and block.published:
            self._removed.append(block.hash)
        block.hash = None
        block.token_ids = ()

    @property
    def has_events(self) -> bool:
        """Whether a drain would return changes (safe to read from another thread: a change appended just
        after the read is drained next time)."""
        return bool(self._stored or self._removed)

    def drain_events(self, with_snapshot: bool = False) -> KVCacheEvents:
        snapshot = tuple(h for h, b in self.cached.items() if self.blocks[b].published) if with_snapshot else None
        events = KVCacheEvents(tuple(self._stored), tuple(self._removed), snapshot)
        self._stored.clear()
        self._removed.clear()
        return events

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise PoolIntegrityError if the pool's bookkeeping is inconsistent. With `expected_refs`
        (block id → references held by live sequences), also check reference counts exactly."""
        for block in self.blocks:
            in_free = block.block_id in self.free
            if block.ref_count < 0 or (block.ref_count == 0) != in_free:
                raise PoolIntegrityError(f"block {block.block_id}: ref {block.ref_count}, free {in_free}")
            if block.hash is not None and self.cached.get(block.hash) != block.block_id:
                raise PoolIntegrityError(f"block {block.block_id}: its hash is not indexed to it")
        for block_hash, block_id in self.cached.items():
            if self.blocks[block_id].hash != block_hash:
                raise PoolIntegrityError(f"hash {block_hash} is indexed to block {block_id}, which holds another")
        if expected_refs is not None:
            for block in self.blocks:
                want = expected_refs.get(block.block_id, 0)
                if block.ref_count != want:
                    raise PoolIntegrityError(f"block {block.block_id}: ref {block.ref_count}, expected {want}")
