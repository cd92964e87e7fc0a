"""The router's choice of workers (cluster/routing.py) over hand-built worker handles: kv_aware weighs
prefix-cache overlap against load, the other policies look at load or turn only."""

from __future__ import annotations

import pytest

from cluster.routing import POLICIES, Route, RoutingPolicy
from cluster.worker_pool import WorkerHandle
from common.worker_record import WorkerRecord, WorkerRole

HASHES = [101, 102, 103, 104, 105, 106, 107, 108]


def worker(worker_id: str, role: WorkerRole, inflight: int = 0, cached: list[int] | None = None) -> WorkerHandle:
    record = WorkerRecord(worker_id=worker_id, role=role, address="127.0.0.1:1", model="m", max_num_seqs=8,
                          num_kv_blocks=64, block_size=16)
    return WorkerHandle(record=record, channel=None, stub=None, inflight=inflight,  # type: ignore[arg-type]
                        cached_blocks=set(cached or []))


# -- WorkerHandle.overlap_blocks ---------------------------------------------------------------------
def test_overlap_counts_the_leading_run_of_cached_blocks() -> None:
    """Overlap is the number of leading prompt blocks held; a block missing in the middle stops the count."""
    handle = worker("p", "prefill", cached=[101, 102, 104, 105, 106])
    assert handle.overlap_blocks(HASHES) == 2
    assert handle.overlap_blocks([]) == 0
    assert handle.overlap_blocks([104, 105]) == 2


def test_overlap_is_zero_when_the_first_block_is_missing() -> None:
    """Later blocks are useless without the first one: no overlap at all."""
    handle = worker("p", "prefill", cached=HASHES[1:])
    assert handle.overlap_blocks(HASHES) == 0


# -- kv_aware --------------------------------------------------------------------------------------
def test_kv_aware_prefers_the_longest_cached_prefix() -> None:
    """With equal load, the prefill worker holding the longest leading prefix is first."""
    decode = worker("d", "decode")
    short = worker("p-short", "prefill", cached=HASHES[:2])
    long = worker("p-long", "prefill", cached=HASHES[:5])
    holey = worker("p-holey", "prefill", cached=[101, *HASHES[2:]])  # 7 blocks cached, leading run of 1
    policy = RoutingPolicy("kv_aware", prefill_retries=0)
    for _ in range(4):  # whatever the round-robin tie-break turn
        route = policy.route([decode], [short, holey, long], HASHES)
        assert route.decode is decode
        assert route.prefill == (long,)
        assert route.overlap_blocks == 5


def test_kv_aware_cost_is_weighted_missing_blocks_plus_inflight() -> None:
    """cost = overlap_weight * missing_blocks + inflight, for prefill and aggregated workers."""
    policy = RoutingPolicy("kv_aware", overlap_weight=2.0)
    assert policy.cost(worker("p", "prefill", inflight=3, cached=HASHES[:5]), HASHES) == 2.0 * 3 + 3
    assert policy.cost(worker("b", "both", inflight=1), HASHES) == 2.0 * 8 + 1
    assert policy.cost(worker("d", "decode", inflight=4, cached=HASHES), HASHES) == 4  # load alone


def test_a_block_in_the_second_tier_costs_its_measured_load_price() -> None:
    """A block only in a worker's second tier extends its held prefix and costs `offload_block_cost` blocks of
    work (1, as if computed, until the worker has measured it); one in the pool costs nothing."""
    policy = RoutingPolicy("kv_aware")
    tiered = worker("p-tier", "prefill", cached=HASHES[:2])
    tiered.offloaded_blocks = set(HASHES[1:6])  # blocks 2..5 only in the tier; 102 in both
    assert tiered.held_prefix(HASHES) == (6, 4) and tiered.overlap_blocks(HASHES) == 6
    mixed = worker("p-mixed", "prefill", cached=[101, 103, 104])
    mixed.offloaded_blocks = {102}
    assert mixed.held_prefix(HASHES) == (2, 1)  # as the engine finds them: the pool's run, then the tier's
    assert policy.cost(tiered, HASHES) == 2 + 4 * 1.0  # unmeasured: tier blocks priced as computed ones
    tiered.offload_block_cost = 0.05
    assert policy.cost(tiered, HASHES) == pytest.approx(2 + 4 * 0.05)
    pool_only = worker("p-pool", "prefill", cached=HASHES[:4])
    route = policy.route([worker("d", "decode")], [pool_only, tiered], HASHES)
    assert route.prefill[0] is tiered and route.overlap_blocks == 6  # 2.2 blocks of work against 4
    tiered.offload_block_cost = 0.6
    assert policy.route([worker("d", "decode")], [pool_only, tiered], HASHES).prefill[0] is pool_only  # 4.4 > 4


def test_a_block_in_the_cluster_store_costs_its_measured_read_for_workers_that_use_the_store() -> None:
    """After what a worker holds, the run of blocks the cluster KV store holds costs `store_block_cost` each on a
    worker that measured one (it uses the store), and full compute on one that did not. So a busy holder of the
    prefix loses to an idle worker that would read it from the store."""
    in_store = set(HASHES[:6]).__contains__
    policy = RoutingPolicy("kv_aware", in_store=in_store)
    holder = worker("p-holder", "prefill", inflight=2, cached=HASHES[:6])
    reader = worker("p-reader", "prefill", cached=HASHES[:1])
    assert policy.cost(reader, HASHES) == 7  # no store measured: the store's blocks count as computed
    reader.store_block_cost = 0.1
    assert policy.cost(reader, HASHES) == pytest.approx(2 + 5 * 0.1)  # 101 held, 102..106 from the store
    assert policy.cost(holder, HASHES) == 2 + 2  # its own blocks first: the store adds nothing after them
    route = policy.route([worker("d", "decode")], [holder, reader], HASHES)
    assert route.prefill[0] is reader and route.overlap_blocks == 1
    assert RoutingPolicy("kv_aware").route([worker("d", "decode")], [holder, reader], HASHES).prefill[0] is holder


def test_kv_aware_trades_overlap_against_load() -> None:
    """A busy worker with the cache loses to an idle one once its load outweighs the blocks it saves."""
    cached = worker("p-cached", "prefill", inflight=3, cached=HASHES[:4])  # cost 4 * w + 3
    idle = worker("p-idle", "prefill", inflight=0)  # cost 8 * w
    decode = worker("d", "decode")
    assert RoutingPolicy("kv_aware", overlap_weight=1.0).route([decode], [cached, idle], HASHES).prefill[0] is cached
    light = RoutingPolicy("kv_aware", overlap_weight=0.5)  # 5.0 vs 4.0
    route = light.route([decode], [cached, idle], HASHES)
    assert route.prefill[0] is idle
    assert route.overlap_blocks == 0  # the overlap of the chosen (first) prefill worker


def test_kv_aware_picks_the_least_loaded_pure_decode_worker() -> None:
    """Pure decode workers are ranked by load alone: a cached prefix does not attract the request."""
    busy_cached = worker("d-a", "decode", inflight=5, cached=HASHES)
    idle = worker("d-b", "decode", inflight=1)
    prefill = worker("p", "prefill")
    policy = RoutingPolicy("kv_aware")
    for _ in range(3):
        assert policy.route([busy_cached, idle], [prefill], HASHES).decode is idle


def test_kv_aware_prices_aggregated_workers_by_overlap_too() -> None:
    """Role both prefills itself, so its cache counts when choosing among aggregated workers."""
    cached = worker("b-a", "both", inflight=2, cached=HASHES)
    cold = worker("b-b", "both", inflight=0)
    route = RoutingPolicy("kv_aware").route([cold, cached], [], HASHES)
    assert route.decode is cached
    assert route.overlap_blocks == len(HASHES)


def test_aggregated_decode_worker_gets_no_prefill_targets() -> None:
    """A worker of role both prefills itself even when prefill workers exist."""
    both = worker("b", "both", cached=HASHES[:3])
    prefill = worker("p", "prefill", cached=HASHES)
    route = RoutingPolicy("kv_aware").route([both], [prefill], HASHES)
    assert route == Route(both, (), 3)


def test_no_prefill_workers_means_no_prefill_route() -> None:
    """A decode worker with no prefill pool prefills itself; the overlap is its own."""
    decode = worker("d", "decode", cached=HASHES[:2])
    for name in POLICIES:
        route = RoutingPolicy(name).route([decode], [], HASHES)
        assert route.decode is decode
        assert route.prefill == ()
        assert route.overlap_blocks == 2


@pytest.mark.parametrize(("retries", "expected_len"), [(0, 1), (1, 2), (2, 3), (5, 3)])
def test_prefill_list_holds_one_plus_retries_workers(retries: int, expected_len: int) -> None:
    """The prefill list is the best worker then `prefill_retries` fallbacks, bounded by the pool, all distinct."""
    prefill = [worker(f"p{i}", "prefill", cached=HASHES[:i]) for i in range(3)]
    route = RoutingPolicy("kv_aware", prefill_retries=retries).route([worker("d", "decode")], prefill, HASHES)
    assert len(route.prefill) == expected_len
    assert len(set(route.prefill)) == expected_len
    assert [w.worker_id for w in route.prefill] == ["p2", "p1", "p0"][:expected_len]  # by cost


# -- round_robin and least_loaded ---------------------------------------------------------------------
def test_round_robin_cycles_over_workers() -> None:
    """Consecutive routes visit every decode worker in turn, whatever their load or cache."""
    decodes = [worker("d0", "decode", inflight=9), worker("d1", "decode", cached=HASHES), worker("d2", "decode")]
    policy = RoutingPolicy("round_robin")
    chosen = [policy.route(decodes, [], HASHES).decode.worker_id for _ in range(6)]
    assert chosen[:3] == chosen[3:]
    assert sorted(chosen[:3]) == ["d0", "d1", "d2"]


def test_round_robin_spreads_prefill_targets() -> None:
    """Prefill targets rotate too: each prefill worker comes first equally often."""
    prefill = [worker(f"p{i}", "prefill") for i in range(3)]
    policy = RoutingPolicy("round_robin", prefill_retries=0)
    firsts = [policy.route([worker("d", "decode")], prefill, HASHES).prefill[0].worker_id for _ in range(6)]
    assert sorted(firsts) == ["p0", "p0", "p1", "p1", "p2", "p2"]


def test_round_robin_visits_every_worker_of_even_sized_pools() -> None:
    """With two decode and two prefill workers, round_robin uses all four."""
    decodes = [worker("d0", "decode"), worker("d1", "decode")]
    prefill = [worker("p0", "prefill"), worker("p1", "prefill")]
    policy = RoutingPolicy("round_robin", prefill_retries=0)
    routes = [policy.route(decodes, prefill, HASHES) for _ in range(4)]
    assert {r.decode.worker_id for r in routes} == {"d0", "d1"}
    assert {r.prefill[0].worker_id for r in routes} == {"p0", "p1"}


def test_least_loaded_picks_min_inflight() -> None:
    """least_loaded ignores the cache and takes the worker with the fewest requests in flight."""
    decodes = [worker("d0", "decode", inflight=4), worker("d1", "decode", inflight=1), worker("d2", "decode", 2)]
    prefill = [worker("p0", "prefill", inflight=3, cached=HASHES), worker("p1", "prefill", inflight=0)]
    policy = RoutingPolicy("least_loaded", prefill_retries=1)
    for _ in range(4):
        route = policy.route(decodes, prefill, HASHES)
        assert route.decode.worker_id == "d1"
        assert [w.worker_id for w in route.prefill] == ["p1", "p0"]
        assert route.overlap_blocks == 0


def test_least_loaded_ties_rotate() -> None:
    """Equally loaded workers share the requests (ties go round-robin)."""
    decodes = [worker("d0", "decode", inflight=1), worker("d1", "decode", inflight=1), worker("d2", "decode", 7)]
    policy = RoutingPolicy("least_loaded")
    chosen = {policy.route(decodes, [], HASHES).decode.worker_id for _ in range(4)}
    assert chosen == {"d0", "d1"}


def test_unknown_policy_name_is_refused() -> None:
    """A policy name outside POLICIES raises ValueError naming the choices."""
    with pytest.raises(ValueError, match="routing policy must be one of"):
        RoutingPolicy("random")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", POLICIES)
def test_the_choice_is_the_full_ranking_in_turn_order(name: str) -> None:
    """Whatever shortcuts a policy takes at a thousand workers (one pass for the top few, a pool tuple
    sorted once, pure decode pools priced by load), it picks what ranking every worker would: sorted by
    id, rotated to this turn's worker, then stably by cost."""
    import random

    rng = random.Random(7)
    for trial in range(40):
        roles: list[WorkerRole] = ["decode", "both"] if trial % 2 else ["decode"]
        decode = tuple(worker(f"d{rng.randrange(1000):03d}-{i}", rng.choice(roles), inflight=rng.randrange(3),
                              cached=HASHES[:rng.randrange(4)]) for i in range(rng.randrange(1, 12)))
        prefill = tuple(worker(f"p{rng.randrange(1000):03d}-{i}", "prefill", inflight=rng.randrange(3),
                               cached=HASHES[:rng.randrange(4)]) for i in range(rng.randrange(0, 12)))
        policy, reference = RoutingPolicy(name, prefill_retries=2), RoutingPolicy(name, prefill_retries=2)
        for _ in range(5):  # the same tuples again: the cached order serves
            route = policy.route(decode, prefill, HASHES)
            expected = {}
            for pool_name, pool in (("decode", decode), ("prefill", prefill)):
                if not pool or (pool_name == "prefill" and expected["decode"][0].record.role == "both"):
                    continue
                ordered = sorted(pool, key=lambda w: w.worker_id)
                start = next(reference._turns[pool_name]) % len(ordered)
                rotated = ordered[start:] + ordered[:start]
                expected[pool_name] = rotated if name == "round_robin" else sorted(
                    rotated, key=lambda w: w.inflight if name == "least_loaded" else reference.cost(w, HASHES))
            assert route.decode is expected["decode"][0]
            assert route.prefill == tuple(expected.get("prefill", [])[:3])
