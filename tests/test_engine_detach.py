"""The decode engine's bookkeeping around a remote prefill that was given up: detached blocks stay held
until released, a parked request gets fresh blocks or is prefilled locally, block events for KV-aware
routing, and the AsyncEngine calls the decode worker makes (engine/remote_kv.py, async_remote_kv.py,
llm_engine.py, block_manager.py, async_engine.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from engine import AsyncEngine, EngineConfig, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams
from engine.block_manager import BlockManager, hash_blocks
from engine.errors import OutOfKVBlocksError
from engine.remote_kv import RemotePrefillResult
from engine.sequence import SequenceStatus

NUM_BLOCKS = 32
BLOCK = 4
PROMPT = [(7 * i) % 90 + 5 for i in range(14)]  # 4 blocks: 3 full, 1 partial
FULL_PROMPT = [(11 * i) % 97 + 9 for i in range(16)]  # exactly 4 full blocks
LONG_PROMPT = [(3 * i) % 200 + 4 for i in range(100)]  # 25 blocks
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
QUARANTINE_S = 600.0  # longer than any test: detached blocks are freed by release() here


def new_engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=NUM_BLOCKS, block_size=BLOCK,
                                  dtype="float32"))


def run(engine: LLMEngine, request_id: str, check: bool = True) -> list[int]:
    """Step until idle; the final token ids of `request_id`. With `check`, integrity after every step."""
    tokens: list[int] = []
    for _ in range(200):
        if not engine.has_unfinished_requests():
            return tokens
        for out in engine.step():
            if out.request_id == request_id:
                tokens = out.token_ids
        if check:
            engine.check_integrity()
    raise AssertionError("the engine did not go idle")


def plain_tokens(tiny_llama_dir, prompt: list[int]) -> list[int]:
    engine = new_engine(tiny_llama_dir)
    engine.add_request(engine.make_request("plain", prompt, GREEDY))
    return run(engine, "plain")


@pytest.fixture(scope="module")
def expected(tiny_llama_dir) -> list[int]:
    """Greedy tokens of PROMPT from a plain, fresh engine."""
    return plain_tokens(tiny_llama_dir, PROMPT)


@pytest.fixture(scope="module")
def expected_full(tiny_llama_dir) -> list[int]:
    """Greedy tokens of FULL_PROMPT from a plain, fresh engine."""
    return plain_tokens(tiny_llama_dir, FULL_PROMPT)


@pytest.fixture
def engine(tiny_llama_dir) -> LLMEngine:
    return new_engine(tiny_llama_dir)


def free_ids(engine: LLMEngine) -> set[int]:
    return set(engine.block_manager.free)


def detached(engine: LLMEngine) -> dict[str, list[int]]:
    return {key: d.block_ids for key, d in engine.remote_kv.detached.items()}


# -- detach / release -----------------------------------------------------------------------------------
def test_detached_blocks_stay_held_until_released(engine: LLMEngine) -> None:
    """Detached blocks are neither free nor the request's; integrity counts them; release frees them."""
    blocks = engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    assert len(blocks) == 4
    engine.remote_kv.detach("r", "r#0", QUARANTINE_S)
    seq = engine.requests["r"].seq
    assert seq.block_table == [] and seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV
    assert detached(engine) == {"r#0": blocks}
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS - 4
    assert not free_ids(engine) & set(blocks)
    assert engine.remote_kv.held_block_refs() == dict.fromkeys(blocks, 1)
    assert engine.scheduler.held_block_refs() == {}
    engine.check_integrity()
    engine.remote_kv.release("r#0")
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS
    assert detached(engine) == {}
    engine.check_integrity()
    engine.remote_kv.release("r#0")  # a second release is a no-op
    engine.check_integrity()


def test_detach_twice_under_one_key_raises(engine: LLMEngine) -> None:
    """A key names one set of detached blocks: reusing it is refused and the second request keeps its blocks."""
    engine.remote_kv.reserve(engine.make_request("a", PROMPT, GREEDY))
    b_blocks = engine.remote_kv.reserve(engine.make_request("b", PROMPT, GREEDY))
    engine.remote_kv.detach("a", "k", QUARANTINE_S)
    with pytest.raises(ValueError, match="already exist"):
        engine.remote_kv.detach("b", "k", QUARANTINE_S)
    assert engine.requests["b"].seq.block_table == b_blocks
    engine.check_integrity()


def test_detach_needs_a_parked_request(engine: LLMEngine) -> None:
    """Only a request waiting for remote KV can have its blocks detached; unknown ids are refused."""
    engine.add_request(engine.make_request("local", PROMPT, GREEDY))
    engine.step()  # now running
    with pytest.raises(ValueError, match="not waiting for remote KV"):
        engine.remote_kv.detach("local", "k", QUARANTINE_S)
    with pytest.raises(InvalidRequestError, match="no request"):
        engine.remote_kv.detach("ghost", "k", QUARANTINE_S)
    assert detached(engine) == {}
    engine.check_integrity()


def test_abort_after_detach_keeps_detached_blocks_held(engine: LLMEngine) -> None:
    """Aborting a parked request whose blocks were detached frees nothing: the old blocks wait for release."""
    blocks = engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    engine.remote_kv.detach("r", "k", QUARANTINE_S)
    final = engine.abort_request("r")
    assert final is not None and final.finished and final.finish_reason == "abort"
    assert "r" not in engine.requests and engine.remote_kv.parked == {}
    assert not free_ids(engine) & set(blocks)
    engine.check_integrity()
    engine.remote_kv.release("k")
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS
    engine.check_integrity()


def test_abort_after_rereserve_frees_only_the_new_blocks(engine: LLMEngine) -> None:
    """After detach + rereserve, abort frees the fresh blocks; the detached ones stay held until release."""
    old = engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    engine.remote_kv.detach("r", "k", QUARANTINE_S)
    new = engine.remote_kv.rereserve("r")
    engine.abort_request("r")
    assert set(new) <= free_ids(engine)
    assert not free_ids(engine) & set(old)
    engine.check_integrity()
    engine.remote_kv.release("k")
    engine.check_integrity()


def test_detached_blocks_are_freed_when_their_quarantine_passes(engine: LLMEngine) -> None:
    """Nobody releases them (the remote writer never answered): the engine frees them itself once
    `quarantine_s` has passed, at its next step, and not before."""
    now = [100.0]
    engine.remote_kv._clock = lambda: now[0]
    blocks = engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    engine.remote_kv.detach("r", "r#0", 5.0)
    engine.abort_request("r")
    assert engine.remote_kv.seconds_to_next_expiry() == 5.0
    now[0] = 104.9
    engine.step()
    assert detached(engine) == {"r#0": blocks} and not free_ids(engine) & set(blocks)
    now[0] = 105.0
    engine.step()
    assert detached(engine) == {} and engine.block_manager.num_free_blocks == NUM_BLOCKS
    assert engine.remote_kv.seconds_to_next_expiry() is None
    engine.check_integrity()
    engine.remote_kv.reserve(engine.make_request("s", PROMPT, GREEDY))
    with pytest.raises(ValueError, match="quarantine_s"):
        engine.remote_kv.detach("s", "k", 0.0)


# -- rereserve -----------------------------------------------------------------------------------------
def test_rereserve_gives_fresh_blocks(engine: LLMEngine) -> None:
    """The next attempt gets as many blocks as before, none of them the detached ones."""
    old = engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    with pytest.raises(ValueError, match="not parked without blocks"):
        engine.remote_kv.rereserve("r")  # still holds its blocks
    engine.remote_kv.detach("r", "r#0", QUARANTINE_S)
    new = engine.remote_kv.rereserve("r")
    assert len(new) == len(old) and not set(new) & set(old)
    assert engine.requests["r"].seq.block_table == new
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS - 8
    engine.check_integrity()


def test_rereserve_raises_when_the_pool_is_exhausted(engine: LLMEngine) -> None:
    """With too few free blocks, rereserve raises OutOfKVBlocksError and the request stays parked, blockless."""
    engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))  # 4 blocks
    engine.remote_kv.detach("r", "k", QUARANTINE_S)
    engine.remote_kv.reserve(engine.make_request("big", LONG_PROMPT, GREEDY))  # 25 blocks
    assert engine.block_manager.num_free_blocks == 3
    with pytest.raises(OutOfKVBlocksError, match="needs 4 KV blocks, 3 are free"):
        engine.remote_kv.rereserve("r")
    seq = engine.requests["r"].seq
    assert seq.block_table == [] and seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV
    engine.check_integrity()
    engine.remote_kv.release("k")
    assert len(engine.remote_kv.rereserve("r")) == 4
    engine.check_integrity()


# -- local prefill after a detach -------------------------------------------------------------------------
def test_local_prefill_after_detach_matches_a_plain_run(engine: LLMEngine, expected: list[int]) -> None:
    """A parked request given up on remotely and prefilled here yields exactly the plain greedy tokens,
    never touching the detached blocks, which stay held throughout."""
    detached = engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    engine.remote_kv.detach("r", "r#0", QUARANTINE_S)
    engine.remote_kv.prefill_locally("r")
    seq = engine.requests["r"].seq
    assert seq.status is SequenceStatus.WAITING and engine.scheduler.waiting[0] is seq
    assert engine.has_unfinished_requests()
    engine.step()
    assert seq.block_table and not set(seq.block_table) & set(detached)
    assert run(engine, "r") == expected
    assert not free_ids(engine) & set(detached)
    engine.remote_kv.release("r#0")
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS
    engine.check_integrity()


def test_prefill_locally_requires_detached_blocks(engine: LLMEngine) -> None:
    """A parked request still holding its blocks cannot be prefilled locally (they might be written)."""
    engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    with pytest.raises(ValueError, match="detach the blocks"):
        engine.remote_kv.prefill_locally("r")
    assert engine.requests["r"].seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV
    engine.check_integrity()


def test_local_prefill_goes_ahead_of_queued_requests(engine: LLMEngine) -> None:
    """A fallback prefill is queued first: it already waited for the remote attempt."""
    engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    engine.add_request(engine.make_request("later", [5, 6, 7], GREEDY))
    engine.remote_kv.detach("r", "k", QUARANTINE_S)
    engine.remote_kv.prefill_locally("r")
    assert [s.request_id for s in engine.scheduler.waiting] == ["r", "later"]


def test_resume_after_detach_is_refused(engine: LLMEngine) -> None:
    """resume on a request whose blocks were detached is refused and leaves it parked."""
    engine.remote_kv.reserve(engine.make_request("r", PROMPT, GREEDY))
    engine.remote_kv.detach("r", "k", QUARANTINE_S)
    with pytest.raises(ValueError):
        engine.remote_kv.resume("r", RemotePrefillResult(PROMPT[0]))
    assert engine.requests["r"].seq.status is SequenceStatus.WAITING_FOR_REMOTE_KV


# -- block events and prefix lookups -------------------------------------------------------------------
def test_block_events_report_stored_hashes(engine: LLMEngine) -> None:
    """With record_events, each computed full block's chained hash (as hash_blocks computes it) is stored."""
    engine.block_manager.record_events = True
    engine.add_request(engine.make_request("r", PROMPT, GREEDY))
    tokens = PROMPT + run(engine, "r")
    computed = len(tokens) - 1  # the last sampled token is never fed back
    events = engine.block_manager.drain_events()
    assert events.stored == tuple(hash_blocks(tokens[:computed], BLOCK))
    assert len(events.stored) == computed // BLOCK
    assert events.removed == ()
    assert engine.block_manager.drain_events().stored == ()  # drained


def test_no_block_events_unless_recording(engine: LLMEngine) -> None:
    """record_events is off by default: nothing accumulates."""
    engine.add_request(engine.make_request("r", PROMPT, GREEDY))
    run(engine, "r")
    events = engine.block_manager.drain_events()
    assert events.stored == () and events.removed == ()


def test_reset_prefix_cache_reports_removed_hashes(engine: LLMEngine) -> None:
    """Dropping the prefix cache reports every cached hash as removed."""
    engine.block_manager.record_events = True
    engine.add_request(engine.make_request("r", PROMPT, GREEDY))
    run(engine, "r")
    stored = engine.block_manager.drain_events().stored
    engine.reset_prefix_cache()
    events = engine.block_manager.drain_events()
    assert events.stored == ()
    assert sorted(events.removed) == sorted(stored)
    assert engine.block_manager.cached == {}
    engine.check_integrity()


def test_eviction_by_allocation_reports_removed_hashes(engine: LLMEngine) -> None:
    """Allocating over free blocks that still hold cached prefixes evicts them and reports their hashes."""
    bm = engine.block_manager
    bm.record_events = True
    engine.add_request(engine.make_request("r", PROMPT, GREEDY))
    run(engine, "r")
    stored = bm.drain_events().stored
    never_used = bm.num_free_blocks - len(stored) - 1  # the partial last block holds no hash
    taken = bm.allocate(never_used)
    assert bm.drain_events().removed == ()  # the LRU order takes never-cached blocks first
    taken += bm.allocate(bm.num_free_blocks)
    assert sorted(bm.drain_events().removed) == sorted(stored)
    assert bm.peek_cached_prefix(hash_blocks(PROMPT, BLOCK), PROMPT) == []
    bm.release(taken)
    bm.check_integrity()


def test_late_blocks_of_a_prompt_are_evicted_first() -> None:
    """A released sequence's tail blocks go first: eviction removes the last block's hash before the first's."""
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    bm.record_events = True
    tokens = [1, 2, 3, 4, 5, 6]
    hashes = hash_blocks(tokens, 2)
    blocks = bm.allocate(3)
    for i, (block_id, h) in enumerate(zip(blocks, hashes, strict=True)):
        bm.register_full_block(block_id, h, tokens[2 * i:2 * i + 2])
    bm.release(blocks)
    assert bm.drain_events().stored == tuple(hashes)
    bm.allocate(1)
    assert bm.drain_events().removed == (hashes[-1],)
    assert len(bm.peek_cached_prefix(hashes, tokens)) == 2


def test_peek_cached_prefix_does_not_count_as_a_lookup(engine: LLMEngine) -> None:
    """peek_cached_prefix finds the cached blocks without touching the hit statistics; find does count."""
    engine.add_request(engine.make_request("r", PROMPT, GREEDY))
    run(engine, "r")
    bm = engine.block_manager
    hashes = hash_blocks(PROMPT, BLOCK)
    before = (bm.stats_hit_blocks, bm.stats_queried_blocks)
    hits = bm.peek_cached_prefix(hashes, PROMPT)
    assert len(hits) == len(hashes) == 3
    assert (bm.stats_hit_blocks, bm.stats_queried_blocks) == before
    assert bm.find_cached_prefix(hashes, PROMPT) == hits
    assert (bm.stats_hit_blocks, bm.stats_queried_blocks) == (before[0] + 3, before[1] + 3)
    assert bm.peek_cached_prefix(hashes, [*PROMPT[:4], 0, *PROMPT[5:]]) == hits[:1]  # tokens are checked too


# -- AsyncEngine -------------------------------------------------------------------------------------------
@pytest.fixture
def async_engine(tiny_llama_dir) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(engine=new_engine(tiny_llama_dir))
    try:
        yield engine
    finally:
        engine.shutdown()


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in stream]


def copy_cached_prompt_kv(engine: LLMEngine, prompt: list[int], blocks: list[int]) -> None:
    """Stand in for a prefill worker: copy the prompt's KV from the prefix cache into `blocks`."""
    sources = engine.block_manager.peek_cached_prefix(hash_blocks(prompt, BLOCK), prompt)
    assert len(sources) == len(blocks), "the whole prompt must be cached"
    pool = engine.parts.pool.tensor
    for src, dst in zip(sources, blocks, strict=True):
        pool[:, dst].copy_(pool[:, src])


async def wait_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        if await engine._call(lambda e: not e.has_unfinished_requests() and not e.remote_kv.parked):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not go idle")


async def test_call_returns_the_function_value(async_engine: AsyncEngine) -> None:
    """call(fn) runs fn on the engine thread with the engine and returns its value."""
    assert (await async_engine.status()).stats.free_blocks == NUM_BLOCKS
    assert await async_engine._call(lambda e: e.remote_kv is not None) is True


async def test_call_raises_the_function_exception(async_engine: AsyncEngine) -> None:
    """An exception of fn is raised to the caller, and the engine keeps serving."""
    def boom(engine: LLMEngine) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await async_engine._call(boom)
    await async_engine._call(lambda e: e.remote_kv.reserve(e.make_request("big", LONG_PROMPT, GREEDY)))
    with pytest.raises(OutOfKVBlocksError):
        await async_engine._call(lambda e: e.remote_kv.reserve(e.make_request("x", LONG_PROMPT, GREEDY)))
    assert await async_engine.abort("big") is True
    final = await async_engine.generate(async_engine.make_request("after", PROMPT, GREEDY))
    assert final.finished and len(final.token_ids) == GREEDY.max_tokens


async def test_remote_prefill_streams_the_plain_tokens(async_engine: AsyncEngine, expected_full: list[int]) -> None:
    """remote_kv.reserve + resume(first greedy token), with the prompt's KV put into the
    reserved blocks, streams exactly what the engine alone generates."""
    plain = await async_engine.generate(async_engine.make_request("plain", FULL_PROMPT, GREEDY))
    assert plain.token_ids == expected_full  # also leaves the prompt's KV in the prefix cache
    blocks, stream = await async_engine.remote_kv.reserve(async_engine.make_request("r", FULL_PROMPT, GREEDY))
    assert len(blocks) == len(FULL_PROMPT) // BLOCK
    await async_engine._call(lambda e: copy_cached_prompt_kv(e, FULL_PROMPT, blocks))
    await async_engine.remote_kv.resume("r", RemotePrefillResult(expected_full[0]))
    outputs = await asyncio.wait_for(collect(stream), timeout=30)
    assert outputs[0].token_ids == [expected_full[0]]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert outputs[-1].token_ids == expected_full
    assert [t for out in outputs for t in out.new_token_ids] == expected_full
    assert (await async_engine.status()).integrity_error is None


async def test_detach_then_prefill_locally_streams_the_plain_tokens(async_engine: AsyncEngine,
                                                                    expected: list[int]) -> None:
    """The decode worker's fallback: reserve, detach, prefill_locally; the stream gives the plain tokens
    and the detached blocks are freed only by their release."""
    blocks, stream = await async_engine.remote_kv.reserve(async_engine.make_request("r", PROMPT, GREEDY))
    await async_engine.remote_kv.detach("r", "r#0", QUARANTINE_S)
    await async_engine.remote_kv.prefill_locally("r")
    outputs = await asyncio.wait_for(collect(stream), timeout=30)
    assert outputs[-1].token_ids == expected
    free = await async_engine._call(lambda e: set(e.block_manager.free))
    assert not free & set(blocks)
    assert (await async_engine.status()).integrity_error is None
    await async_engine.remote_kv.release("r#0")
    assert (await async_engine.status()).stats.free_blocks == NUM_BLOCKS


async def test_reserve_failure_leaves_no_stream(async_engine: AsyncEngine) -> None:
    """A reservation refused for lack of blocks raises and frees the request id for reuse."""
    await async_engine.remote_kv.reserve(async_engine.make_request("big", LONG_PROMPT, GREEDY))  # 25 of 32 blocks
    with pytest.raises(OutOfKVBlocksError):
        await async_engine.remote_kv.reserve(async_engine.make_request("r", LONG_PROMPT[:40], GREEDY))
    assert await async_engine.abort("big") is True
    blocks, _ = await async_engine.remote_kv.reserve(async_engine.make_request("r", LONG_PROMPT[:40], GREEDY))
    assert len(blocks) == 10
    assert await async_engine.abort("r") is True
    assert (await async_engine.status()).stats.free_blocks == NUM_BLOCKS


async def test_abort_reports_whether_the_request_was_live(async_engine: AsyncEngine) -> None:
    """abort is True for a live request (parked or running) and ends its stream with reason abort;
    False for an unknown or already aborted one."""
    _, parked_stream = await async_engine.remote_kv.reserve(async_engine.make_request("parked", PROMPT, GREEDY))
    assert await async_engine.abort("parked") is True
    parked_out = await asyncio.wait_for(collect(parked_stream), timeout=30)
    assert parked_out[-1].finished and parked_out[-1].finish_reason == "abort"
    assert await async_engine.abort("parked") is False
    assert await async_engine.abort("nobody") is False

    long = SamplingParams(max_tokens=200, ignore_eos=True)
    running = await async_engine.add_request(async_engine.make_request("running", PROMPT, long))
    assert await async_engine.abort("running") is True  # the add was queued before the abort
    running_out = await asyncio.wait_for(collect(running), timeout=30)
    assert running_out[-1].finish_reason == "abort"
    await wait_idle(async_engine)
    assert (await async_engine.status()).stats.free_blocks == NUM_BLOCKS
    assert (await async_engine.status()).integrity_error is None


async def test_abort_of_a_detached_parked_request_keeps_the_old_blocks(async_engine: AsyncEngine) -> None:
    """The decode worker's cancel path: detach, abort (True), then release; blocks free only after release."""
    blocks, _ = await async_engine.remote_kv.reserve(async_engine.make_request("r", PROMPT, GREEDY))
    await async_engine.remote_kv.detach("r", "k", QUARANTINE_S)
    assert await async_engine.abort("r") is True
    assert await async_engine._call(lambda e: set(e.block_manager.free) & set(blocks)) == set()
    assert (await async_engine.status()).integrity_error is None
    await async_engine.remote_kv.release("k")
    assert (await async_engine.status()).stats.free_blocks == NUM_BLOCKS


async def test_seeded_sampling_after_a_remote_prefill_matches_the_engine_alone(async_engine: AsyncEngine) -> None:
    """The remote engine drew the first token's uniform from the request's seeded generator: the
    decode engine skips that draw, so the rest of the stream is the engine alone's."""
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    plain = await async_engine.generate(async_engine.make_request("plain", FULL_PROMPT, seeded))
    blocks, stream = await async_engine.remote_kv.reserve(async_engine.make_request("r", FULL_PROMPT, seeded))
    await async_engine._call(lambda e: copy_cached_prompt_kv(e, FULL_PROMPT, blocks))
    await async_engine.remote_kv.resume("r", RemotePrefillResult(plain.token_ids[0]))
    outputs = await asyncio.wait_for(collect(stream), timeout=30)
    assert outputs[-1].token_ids == plain.token_ids


async def test_an_idle_engine_frees_expired_detached_blocks_by_itself(async_engine: AsyncEngine) -> None:
    """No request runs and nothing calls the engine: its loop wakes when the quarantine ends."""
    blocks, _ = await async_engine.remote_kv.reserve(async_engine.make_request("r", PROMPT, GREEDY))
    await async_engine.remote_kv.detach("r", "k", 0.3)
    assert await async_engine.abort("r") is True
    assert (await async_engine.status()).stats.free_blocks == NUM_BLOCKS - len(blocks)
    await asyncio.sleep(0.6)
    assert async_engine.stats().free_blocks == NUM_BLOCKS
    assert (await async_engine.status()).integrity_error is None


def test_a_block_evicted_and_cached_again_within_one_drain_is_reported_held() -> None:
    """Applying `stored` then `removed` gives the exact final set, whatever the order of changes."""
    bm = BlockManager(2, BLOCK, enable_prefix_caching=True)
    bm.record_events = True
    tokens = (1, 2, 3, 4)
    [h] = hash_blocks(tokens, BLOCK)
    [first] = bm.allocate(1)
    bm.register_full_block(first, h, tokens)
    bm.release([first])
    bm.drain_events()
    bm.allocate(2)  # evicts h
    bm.release([0, 1])
    [again] = bm.allocate(1)
    bm.register_full_block(again, h, tokens)  # cached again before the next drain
    events = bm.drain_events()
    held: set[int] = {h}
    held |= set(events.stored)
    held -= set(events.removed)
    assert held == set(bm.cached) == {h}
