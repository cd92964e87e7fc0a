"""Scheduler: token budget, chunked prefill mixed with decodes, preemption, priorities."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
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
