"""Scheduler: token budget, chunked prefill mixed with decodes, preemption, priorities."""

from __future__ import annotations

from engine.block_manager import BlockManager, group_key, hash_blocks
from engine.config import SchedulerConfig
from engine.kv_groups import KVGroups
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def make(request_id: str, n: int, priority: int = 0, t: float = 0.0, first: int = 1) -> Sequence:
    return Sequence(request_id, list(range(first, first + n)), SamplingParams(), None, priority=priority,  # type: ignore[arg-type]
                    arrival_time=t)


def run_step(sched: Scheduler, next_token: int = 7) -> dict[str, int]:
    """Schedule one step and commit a fake sampled token for every sampling sequence."""
    out = sched.schedule()
    for item in out.scheduled:
        sched.commit(item, [next_token] if item.samples else [])
    return {item.seq.request_id: item.num_tokens for item in out.scheduled}


def test_chunked_prefill_shares_the_budget_with_decodes() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(64, 16, True))
    sched.add(make("a", 10, t=0))
    assert run_step(sched) == {"a": 10}
    sched.add(make("b", 200, t=1, first=500))
    assert run_step(sched) == {"a": 1, "b": 63}  # the decode goes first, the prefill takes the rest
    assert run_step(sched) == {"a": 1, "b": 63}
    b = sched.running[1]
    assert b.num_computed_tokens == 126 and b.num_output_tokens == 0
    run_step(sched)
    assert run_step(sched) == {"a": 1, "b": 11}
    assert b.num_output_tokens == 1
    sched.blocks.check_integrity(sched.held_block_refs())


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=128, max_model_len=128, enable_chunked_prefill=False),
                      BlockManager(64, 16, True))
    sched.add(make("a", 100, t=0))
    sched.add(make("b", 100, t=1, first=500))
    assert run_step(sched) == {"a": 100}  # b is not split to fill the 28 tokens left
    assert run_step(sched) == {"a": 1, "b": 100}


def test_max_num_seqs_caps_the_batch() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 16, True))
    for i in range(3):
        sched.add(make(str(i), 5, t=i))
    assert set(run_step(sched)) == {"0", "1"}


def test_preemption_takes_the_latest_and_recomputes_it() -> None:
    # 4 blocks of 4 tokens: two 7-token prompts fit (2 blocks each), growing past 8 tokens needs a 3rd.
    sched = Scheduler(SchedulerConfig(), BlockManager(4, 4, True))
    sched.add(make("old", 7, t=0))
    sched.add(make("new", 7, t=1, first=500))
    run_step(sched)
    run_step(sched)  # both now hold 8 tokens (7 + 1 sampled) with 7 computed
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["new"]
    new = out.preempted[0]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert [s.seq.request_id for s in out.scheduled] == ["old"]
    sched.blocks.check_integrity(sched.held_block_refs())


def test_priority_policy_admits_and_preempts_by_priority() -> None:
    sched = Scheduler(SchedulerConfig(policy="priority", max_num_seqs=1), BlockManager(16, 4, True))
    sched.add(make("low", 3, priority=5, t=0))
    sched.add(make("high", 3, priority=1, t=1))
    assert set(run_step(sched)) == {"high"}


def test_finish_releases_blocks_into_the_prefix_cache() -> None:
    bm = BlockManager(8, 4, True)
    sched = Scheduler(SchedulerConfig(), bm)
    a = make("a", 9)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    assert bm.num_free_blocks == 8 and len(bm.cached) == 2
    b = make("b", 10, t=1)
    sched.add(b)
    assert run_step(sched) == {"b": 2}  # 8 tokens come from the cache
    assert b.num_cached_tokens == 8


HYBRID = KVGroups.of(4, (8, 0, 8, 0), hybrid=True)  # two windowed layers (window 8), two global: a group of each


def test_a_hybrid_layout_groups_layers_of_one_kind() -> None:
    assert HYBRID.group_size == 2 and HYBRID.windows == (0, 8)
    assert HYBRID.placement == ((1, 0), (0, 0), (1, 1), (0, 1))
    gemma3 = KVGroups.of(26, tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(26)), hybrid=True)
    assert gemma3.group_size == 4 and gemma3.windows == (0,) + (512,) * 6 and gemma3.num_padded_slots == 2
    assert sorted(gemma3.placement) == sorted(set(gemma3.placement))  # one slot per layer
    assert gemma3.slot_windows(0, tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(26))) == (0, 0, 0, 0)
    # Gemma 3 27B: 10 global layers of 62; groups of 13 would pad fewer slots (65) but 3 of them global ones,
    # which cost memory for every token of a context: groups of 10, the global one full
    gemma3_27b = KVGroups.of(62, tuple(0 if (i + 1) % 6 == 0 else 1024 for i in range(62)), hybrid=True)
    assert gemma3_27b.group_size == 10 and gemma3_27b.num_groups == 7 and gemma3_27b.padded_slots(0) == []
    assert not KVGroups.of(4, (8, 0, 8, 0), hybrid=False).is_hybrid
    assert KVGroups.of(4, (8,) * 4, hybrid=True) == KVGroups.single(4, 8)


def test_a_hybrid_sequence_gives_back_only_its_windowed_groups_blocks() -> None:
    blocks = BlockManager(64, 4, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), blocks, groups=HYBRID)
    sched.add(make("a", 30))
    while sched.running or sched.waiting:
        run_step(sched)
        seq = sched.running[0]
        blocks.check_integrity(sched.held_block_refs())
        held = 64 - blocks.num_free_blocks
        # global: every block of the context; windowed: those the window of the next position reaches
        assert held == 2 * len(seq.block_table) - seq.num_blocks_behind_window
        if seq.num_computed_tokens >= 40:
            break
    assert seq.num_blocks_behind_window == sched.blocks_behind_window(seq.num_computed_tokens) > 0
    assert null_free(seq.block_table, blocks) and not null_free(seq.group_tables[0], blocks)
    sched.finish(seq, "stop")
    assert blocks.num_free_blocks == 64


def null_free(table: list[int], blocks: BlockManager) -> bool:
    return blocks.null_block_id not in table


def test_a_hybrid_prefix_hit_needs_every_group() -> None:
    """The global group's blocks 0-9 are cached but the windowed group's last one is not: the run whose window's
    KV every group holds is one block shorter, in every group."""
    blocks = BlockManager(64, 4, True)
    sched = Scheduler(SchedulerConfig(), blocks, groups=HYBRID)
    tokens = list(range(1, 42))
    hashes = hash_blocks(tokens, 4)
    for group, count in ((0, 10), (1, 9)):
        ids = blocks.allocate(count)
        for i, (block_id, block_hash) in enumerate(zip(ids, hashes, strict=False)):
            blocks.register_full_block(block_id, group_key(block_hash, group), tokens[4 * i:4 * i + 4])
        blocks.release(ids)
    found = sched.cached_prefix_blocks(hashes[:10], tokens)
    assert [len(f) for f in found] == [9, 9]
    assert None not in found[0] and found[1][:sched.blocks_behind_window(36)] == [None] * 7
    seq = make("b", 41)
    sched.add(seq)
    out = sched.schedule()
    assert out.scheduled[0].start == 36  # 9 blocks served from both groups
    blocks.check_integrity(sched.held_block_refs())
