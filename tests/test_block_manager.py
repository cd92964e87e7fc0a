"""Block manager: allocation, reference counts, prefix-cache hits, LRU eviction, integrity."""

import subprocess
import sys

import pytest

from engine.block_manager import BlockManager, hash_block, hash_blocks
from engine.errors import PoolIntegrityError


def test_hashes_chain_and_depend_on_every_token() -> None:
    a = hash_blocks(list(range(48)), 16)
    b = hash_blocks([*range(47), 999], 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    # A block's hash depends on its parent: same tokens after a different prefix hash differently.
    assert hash_block(a[0], range(16, 32)) == a[1]
    assert hash_block(a[1], range(16, 32)) != a[1]
    assert hash_blocks(list(range(15)), 16) == []


def test_hashes_equal_across_processes() -> None:
    code = "from engine.block_manager import hash_blocks; print(hash_blocks(list(range(100)), 16))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert outs == {f"{hash_blocks(list(range(100)), 16)}\n"}


def test_allocate_release_and_integrity() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert sorted(a + b) == list(range(8)) and bm.num_free_blocks == 0
    bm.check_integrity({i: 1 for i in a + b})
    with pytest.raises(RuntimeError):
        bm.allocate(1)
    bm.release(a)
    assert bm.num_free_blocks == 3
    bm.check_integrity({i: 1 for i in b})
    with pytest.raises(PoolIntegrityError, match="expected 1"):
        bm.check_integrity({i: 1 for i in a + b})


def test_prefix_hit_shares_blocks_and_eviction_is_lru() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4]
    hashes = hash_blocks(tokens, 2)
    owner = bm.allocate(2)
    for block_id, h, i in zip(owner, hashes, (0, 2), strict=True):
        bm.register_full_block(block_id, h, tokens[i:i + 2])
    assert bm.find_cached_prefix(hashes, tokens) == owner
    bm.take_cached(owner)  # a second sequence shares them
    bm.check_integrity({owner[0]: 2, owner[1]: 2})
    bm.release(owner)
    bm.release(owner)
    bm.check_integrity({})
    # Freed but still cached: found again.
    assert bm.find_cached_prefix(hashes, tokens) == owner
    # Two never-used blocks go first, then the cached ones, tail block (released first) before head.
    fresh = bm.allocate(3)
    assert set(fresh[:2]).isdisjoint(owner) and fresh[2] == owner[1]
    assert bm.find_cached_prefix(hashes, tokens) == [owner[0]]
    bm.check_integrity({b: 1 for b in fresh})


def test_colliding_hash_with_other_tokens_is_not_a_hit() -> None:
    bm = BlockManager(2, 2, enable_prefix_caching=True)
    [block] = bm.allocate(1)
    bm.register_full_block(block, 123, [7, 8])
    assert bm.find_cached_prefix([123], [7, 9]) == []
    assert bm.find_cached_prefix([123], [7, 8]) == [block]


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(2, 2, enable_prefix_caching=False)
    [block] = bm.allocate(1)
    bm.register_full_block(block, 5, [1, 2])
    assert bm.find_cached_prefix([5], [1, 2]) == []
