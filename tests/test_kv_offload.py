"""The second KV tier (engine.kv_offload): blocks leaving the pool are copied out and loaded back on a prefix
hit; never read while written; LRU within its capacity; exact greedy outputs with fewer tokens computed."""

from __future__ import annotations

import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager, hash_blocks
from engine.errors import PoolIntegrityError
from engine.kv_cache import KVCachePool, KVCacheSpec
from engine.kv_offload import KVOffloadTier
from tests.support.prompts import text_of_about

BLOCK = 4


def _pool(num_blocks: int = 8, dtype: torch.dtype = torch.bfloat16) -> KVCachePool:
    spec = KVCacheSpec(num_layers=3, num_blocks=num_blocks, block_size=BLOCK, num_kv_heads=2, head_dim=8, dtype=dtype)
    pool = KVCachePool(spec, torch.device("cpu"), torch.float32)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(dtype))
    return pool


def _tier(capacity_blocks: int, num_blocks: int = 8, dtype: torch.dtype = torch.bfloat16,
          background_writes: bool = False) -> tuple[KVCachePool, KVOffloadTier, BlockManager]:
    """A pool of random KV, a tier behind it, and a block manager that tells the tier."""
    pool = _pool(num_blocks, dtype)
    tier = KVOffloadTier(pool, capacity_blocks, background_writes=background_writes)
    bm = BlockManager(num_blocks, BLOCK, enable_prefix_caching=True)
    bm.offload = tier
    return pool, tier, bm


def _cached(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[int]]:
    """Blocks holding `tokens`' full blocks, registered in the prefix cache and held once: (ids, hashes)."""
    hashes = hash_blocks(tokens, BLOCK)
    ids = bm.allocate(len(hashes))
    for i, (block_id, block_hash) in enumerate(zip(ids, hashes, strict=True)):
        bm.register_full_block(block_id, block_hash, tokens[i * BLOCK:(i + 1) * BLOCK])
    return ids, hashes


def test_block_is_stored_on_release_and_loaded_back_byte_exact() -> None:
    pool, tier, bm = _tier(4)
    tokens = list(range(100, 108))
    ids, hashes = _cached(bm, tokens)
    original = pool.byte_rows()[:, ids].clone()
    bm.release(ids)
    assert tier.match(hashes, tokens, 0) == []  # queued, not written: not readable
    tier.check_integrity()
    bm.allocate(8)  # reuses every block: the pool finishes the copies before handing them out
    assert tier.stats().writes_finished_on_reuse == 2
    assert tier.match(hashes, tokens, 0) == hashes
    pool.tensor.zero_()
    tier.stage(hashes, [5, 2], num_looked_up=2)
    assert pool.tensor.abs().sum() == 0  # staged, not copied yet
    tier.run_staged()
    assert torch.equal(pool.byte_rows()[:, [5, 2]], original)
    stats = tier.stats()
    assert (stats.queried_blocks, stats.loaded_blocks, stats.stored_blocks) == (2, 2, 2)
    tier.check_integrity()


def test_lookup_checks_tokens_and_stops_at_the_first_gap() -> None:
    _, tier, bm = _tier(4)
    tokens = list(range(12))
    ids, hashes = _cached(bm, tokens)
    bm.release(ids)
    tier.flush()
    assert tier.match(hashes, tokens, 0) == hashes
    assert tier.match(hashes[1:], tokens, 1) == hashes[1:]  # a lookup after the pool's own hits
    other = [*tokens[:4], 99, *tokens[5:]]  # same hashes claimed for other tokens: a collision, refused
    assert tier.match(hashes, other, 0) == hashes[:1]
    assert tier.match([hashes[0], 12345, hashes[2]], tokens, 0) == hashes[:1]


def test_lru_within_capacity_and_no_room_while_every_slot_is_written() -> None:
    _, tier, bm = _tier(2)
    a_ids, a = _cached(bm, list(range(0, 4)))
    b_ids, b = _cached(bm, list(range(10, 14)))
    c_ids, _ = _cached(bm, list(range(20, 24)))
    bm.release(a_ids)
    bm.release(b_ids)
    bm.release(c_ids)  # both slots are being written: c is dropped, not written over them
    assert tier.stats().dropped_blocks == 1
    tier.flush()
    assert tier.match(a, list(range(0, 4)), 0) == a  # a is now the most recently used
    d_ids, d = _cached(bm, list(range(30, 34)))
    bm.release(d_ids)  # evicts b, the least recently used
    tier.flush()
    assert tier.match(b, list(range(10, 14)), 0) == [] and tier.match(a, list(range(0, 4)), 0) == a
    assert tier.match(d, list(range(30, 34)), 0) == d
    assert tier.stats().evicted_blocks == 1 and tier.stats().used_blocks == 2
    tier.check_integrity()
    tier.clear()
    assert tier.match(a, list(range(0, 4)), 0) == [] and tier.stats().used_blocks == 0
    tier.check_integrity()


def test_a_staged_entry_is_not_evicted_before_its_load() -> None:
    pool, tier, bm = _tier(1)
    a_ids, a = _cached(bm, list(range(0, 4)))
    original = pool.byte_rows()[:, a_ids[0]].clone()
    bm.release(a_ids)
    tier.flush()
    tier.stage(a, [6], num_looked_up=1)
    b_ids, _ = _cached(bm, list(range(10, 14)))
    bm.release(b_ids)  # no room: the only entry is staged, so b is dropped rather than written over it
    tier.flush()
    assert tier.stats().dropped_blocks == 1 and tier.stats().evicted_blocks == 0
    tier.run_staged()
    assert torch.equal(pool.byte_rows()[:, 6], original)
    tier.check_integrity()


def test_integrity_check_finds_a_broken_tier() -> None:
    _, tier, bm = _tier(2)
    ids, hashes = _cached(bm, list(range(0, 8)))
    bm.release(ids)
    tier.check_integrity()  # pending copies are consistent too
    tier.flush()
    tier.stage(hashes[:1], [5], num_looked_up=1)
    tier.check_integrity()  # a load staged between two steps
    tier._staged.clear()  # a staged load lost: its entry would never be evictable again
    with pytest.raises(PoolIntegrityError, match="staged"):
        tier.check_integrity()
    tier._index[hashes[0]].staged = 0
    tier._free_slots.append(tier._index[hashes[1]].slot)  # a held slot handed out again
    with pytest.raises(PoolIntegrityError, match="both free and held"):
        tier.check_integrity()


def test_events_say_what_became_readable_and_what_left() -> None:
    _, tier, bm = _tier(2)
    tier.record_events = True
    a_ids, a = _cached(bm, list(range(0, 8)))
    bm.release(a_ids)
    assert not tier.has_events  # queued copies are not readable yet
    tier.flush()
    stored, removed, snapshot = tier.drain_events(with_snapshot=False)
    assert set(stored) == set(a) and removed == () and snapshot is None
    b_ids, b = _cached(bm, list(range(10, 14)))
    bm.release(b_ids)  # evicts a[1]: the pool frees a sequence's tail first, so its tail is the older entry
    tier.flush()
    stored, removed, snapshot = tier.drain_events(with_snapshot=True)
    assert (stored, removed) == (tuple(b), (a[1],)) and set(snapshot or ()) == {a[0], b[0]}
    tier.clear()
    assert set(tier.drain_events(with_snapshot=False)[1]) == {a[0], b[0]} and not tier.has_events


def test_background_writer_stores_freed_blocks() -> None:
    pool, tier, bm = _tier(16, num_blocks=16, dtype=torch.float32, background_writes=True)
    try:
        tokens = list(range(40))
        ids, hashes = _cached(bm, tokens)
        original = pool.byte_rows()[:, ids].clone()
        bm.release(ids)
        deadline = time.monotonic() + 10
        while tier.stats().stored_blocks < len(ids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tier.stats().stored_blocks == len(ids) and tier.stats().writes_finished_on_reuse == 0
        assert tier.match(hashes, tokens, 0) == hashes
        pool.tensor.zero_()
        tier.stage(hashes, ids, num_looked_up=len(ids))
        tier.run_staged()
        assert torch.equal(pool.byte_rows()[:, ids], original)
        tier.check_integrity()
    finally:
        tier.close()


GREEDY = SamplingParams(temperature=0, max_tokens=8)


def _conversations(llm: LLM, turns: int, batched: bool) -> tuple[list[list[int]], list[int]]:
    """Three conversations of ~200 tokens taking turns (so that they evict each other from a small pool):
    every turn's outputs, and the prompt tokens computed at each turn."""
    tok = llm.tokenizer
    convs = [text_of_about(tok, 200, seed) for seed in range(3)]
    outs, computed = [], []
    for turn in range(turns):
        before = llm.engine.num_computed_tokens_total
        if batched:
            results = llm.generate(convs, GREEDY)
        else:
            results = [llm.generate([conv], GREEDY)[0] for conv in convs]
        computed.append(llm.engine.num_computed_tokens_total - before)
        for i, result in enumerate(results):
            outs.append(result.token_ids)
            convs[i] = convs[i] + result.token_ids + text_of_about(tok, 20, 100 + 3 * turn + i)
    return outs, computed


@pytest.fixture(scope="module")
def unbounded(default_model_path) -> tuple[list[list[int]], list[int]]:
    llm = LLM(str(default_model_path), dtype="float32", num_kv_blocks=256, max_model_len=320)
    return _conversations(llm, 3, batched=False)


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched-chunked"])
def test_returning_prefix_is_loaded_not_computed_and_outputs_stay_exact(default_model_path, unbounded,
                                                                       batched: bool) -> None:
    """The pool (20 blocks of 16: one conversation and a bit) is too small for three: without the tier each
    returning turn recomputes its whole history; with it, only its new tokens. fp32: outputs do not depend on
    the batch shape, so they must equal an unbounded pool's one by one."""
    options = dict(dtype="float32", num_kv_blocks=20, max_model_len=320,
                   max_num_batched_tokens=64 if batched else 2048)
    small = LLM(str(default_model_path), **options)
    tiered = LLM(str(default_model_path), kv_offload_bytes=64 << 20, **options)
    try:
        no_tier_outs, no_tier_computed = _conversations(small, 3, batched)
        outs, computed = _conversations(tiered, 3, batched)
        engine, tier = tiered.engine, tiered.engine.offload
        assert tier is not None
        assert outs == unbounded[0]
        if not batched:
            assert no_tier_outs == unbounded[0]
            assert computed == unbounded[1]  # new tokens only, as with a pool that holds everything
        assert computed[0] == no_tier_computed[0]
        for later, recomputed in zip(computed[1:], no_tier_computed[1:], strict=True):
            assert later < recomputed / 3, (computed, no_tier_computed)
        assert tier.stats().loaded_blocks >= 2 * 3 * (200 // 16)
        # priced for routing from what was measured here: a load is a small fraction of computing the block
        assert 0 < engine.offload_block_cost() < 0.5
        engine.check_integrity()
        tier.check_integrity()
    finally:
        tiered.engine.close()


def _staggered_turns(llm: LLM) -> list[list[int]]:
    """Six ~120-token conversations, two turns, all in one batch, ending at different steps (4 to 14 tokens):
    sequences end while others run, and the blocks they free admit waiting ones."""
    tok = llm.tokenizer
    convs = [text_of_about(tok, 120, 20 + i) for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 2 * i, ignore_eos=True) for i in range(6)]
    outs = []
    for turn in range(2):
        results = llm.generate(convs, params)
        outs += [r.token_ids for r in results]
        convs = [c + r.token_ids + text_of_about(tok, 10, 40 + 6 * turn + i)
                 for i, (c, r) in enumerate(zip(convs, results, strict=True))]
    return outs


def test_async_scheduling_loads_only_while_no_forward_runs(default_model_path) -> None:
    """With async scheduling a step is in flight while the next is scheduled, and it may still write a block
    freed at the last commit (a sequence that ended on a sampled token: its row in vain), which that schedule
    can hand out again: second-tier copies into the pool must wait for the step in flight. Every copy into the
    pool is checked to run with nothing in flight, and some admissions with tier hits are scheduled while a step
    is in flight; the outputs equal the plain engine's with a pool that holds everything (fp32)."""
    expected = _staggered_turns(LLM(str(default_model_path), dtype="float32", num_kv_blocks=256, max_model_len=320))
    llm = LLM(str(default_model_path), dtype="float32", num_kv_blocks=28, max_model_len=320,
              kv_offload_bytes=64 << 20, async_scheduling=True, max_num_batched_tokens=64)
    engine, tier = llm.engine, llm.engine.offload
    assert tier is not None and engine.pipeline is not None
    pool = engine.kv_pool.byte_rows()
    pool_span = (pool.data_ptr(), pool.data_ptr() + pool.numel())
    copy, stage, loads, staged_in_flight = tier._copy, tier.stage, [], []

    def checked_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        if pool_span[0] <= dst.data_ptr() < pool_span[1]:  # a load into the pool
            assert engine.pipeline is not None and engine.pipeline._in_flight is None, "loaded during a forward"
            loads.append(1)
        copy(dst, src)

    def watched_stage(block_hashes, block_ids, num_looked_up) -> None:  # type: ignore[no-untyped-def]
        staged_in_flight.append(engine.pipeline is not None and engine.pipeline._in_flight is not None)
        stage(block_hashes, block_ids, num_looked_up)

    tier._copy, tier.stage = checked_copy, watched_stage  # type: ignore[method-assign]
    try:
        assert _staggered_turns(llm) == expected
        assert len(loads) == tier.stats().loaded_blocks > 0
        assert any(staged_in_flight)  # the case this guards was reached
        engine.check_integrity()
        tier.check_integrity()
    finally:
        engine.close()


def test_prefix_cache_reset_empties_the_tier(default_model_path) -> None:
    llm = LLM(str(default_model_path), dtype="float32", num_kv_blocks=20, max_model_len=320,
              kv_offload_bytes=32 << 20)  # 44 blocks: both prompts
    try:
        prompt = text_of_about(llm.tokenizer, 200, 7)
        llm.generate([prompt], GREEDY)
        llm.generate([text_of_about(llm.tokenizer, 200, 8)], GREEDY)  # evicts the first prompt's blocks
        assert llm.engine.offload is not None
        llm.engine.offload.flush()
        assert llm.engine.offload.stats().used_blocks > 0
        assert len(llm.engine.block_manager.peek_cached_prefix(hash_blocks(prompt, 16), prompt)) < 12  # tail evicted
        assert llm.engine.remote_kv.cached_prefix_tokens(prompt) == 192  # still held: a decode worker prefills it
        llm.engine.reset_prefix_cache()
        assert llm.engine.offload.stats().used_blocks == 0
        assert llm.engine.remote_kv.cached_prefix_tokens(prompt) == 0
        before = llm.engine.num_computed_tokens_total
        llm.generate([prompt], GREEDY)
        assert llm.engine.num_computed_tokens_total - before == 200 + GREEDY.max_tokens - 1
        llm.engine.offload.check_integrity()
    finally:
        llm.engine.close()


def test_offload_needs_room_for_a_block(default_model_path) -> None:
    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(str(default_model_path), num_kv_blocks=20, max_model_len=320, kv_offload_bytes=1000)
