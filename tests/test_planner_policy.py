"""The SLO planner's policy (cluster/planner/policy.py) on synthetic observations: latency and
load triggers, cooldown, hysteresis (a sustained comfortable streak before shrinking), bounds, the
budget across pools, and no oscillation on steady load; and the capacity profile's arithmetic."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from cluster.planner.capacity import CapacityProfile, DecodePoint
from cluster.planner.observation import Observation
from cluster.planner.policy import Decision, Policy
from cluster.planner.settings import POOLS, PlannerSettings, Pool

SETTINGS = PlannerSettings(ttft_target_s=0.5, itl_target_s=0.05, planner_interval_s=1, planner_window_s=10,
                           cooldown_s=30, scale_down_delay_s=60, min_prefill_workers=1, max_prefill_workers=4,
                           min_decode_workers=1, max_decode_workers=6, max_total_workers=10)
# one decode worker: ITL p90 10 ms alone, 50 ms (the target) at 8 streams, 100 ms at 16
PROFILE = CapacityProfile(prefill_tokens_per_s=1000.0, decode=tuple(
    DecodePoint(b, {"0.5": t * 0.8, "0.9": t}, b / t) for b, t in ((1, 0.01), (4, 0.03), (8, 0.05), (16, 0.1))))


def obs(itl: float | None = None, streams: float = 0.0, ttft: float | None = None,
        prompt_tokens_per_s: float = 0.0) -> Observation:
    return Observation(window_s=10, ttft_s=ttft, itl_s=itl, prompt_tokens_per_s=prompt_tokens_per_s, streams=streams)


def decode(decisions: list[Decision]) -> Decision:
    return next(d for d in decisions if d.pool == "decode")


def prefill(decisions: list[Decision]) -> Decision:
    return next(d for d in decisions if d.pool == "prefill")


def test_latency_over_target_grows_the_pool_by_one_then_cooldown() -> None:
    policy = Policy(SETTINGS, None)
    d = decode(policy.decide(0, obs(itl=0.08, streams=4), {"prefill": 1, "decode": 1}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 2, "itl_over_target")
    assert "target=0.0500s" in d.line() and "itl=0.0800s" in d.line() and "decode 1->2" in d.line()
    for t in (1, 15, 29.9):  # still over target, but the pool was just scaled
        d = decode(policy.decide(t, obs(itl=0.08, streams=4), {"prefill": 1, "decode": 2}))
        assert (d.action, d.reason) == ("hold", "cooldown")
    d = decode(policy.decide(30, obs(itl=0.08, streams=4), {"prefill": 1, "decode": 2}))
    assert (d.action, d.desired) == ("scale_up", 3)


def test_load_over_the_profiled_capacity_grows_the_pool_at_once_within_its_max() -> None:
    policy = Policy(SETTINGS, PROFILE)
    assert policy.models["decode"].capacity == pytest.approx(8.0)
    d = decode(policy.decide(0, obs(itl=0.04, streams=30), {"prefill": 1, "decode": 1}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 5, "stream_load")  # ceil(30 / 8 / 0.9)
    d = decode(Policy(SETTINGS, PROFILE).decide(0, obs(itl=0.04, streams=100), {"prefill": 1, "decode": 1}))
    assert (d.action, d.desired) == ("scale_up", 6)  # needs 14, max 6
    d = decode(policy.decide(100, obs(itl=0.09, streams=100), {"prefill": 1, "decode": 6}))
    assert (d.action, d.desired, d.reason) == ("hold", 6, "at_max")


def test_a_missed_target_is_the_reason_even_when_the_load_asks_for_more() -> None:
    d = decode(Policy(SETTINGS, PROFILE).decide(0, obs(itl=0.2, streams=30), {"prefill": 1, "decode": 1}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 5, "itl_over_target")


def test_shrinking_needs_a_sustained_comfortable_streak() -> None:
    policy = Policy(SETTINGS, PROFILE)
    current: dict[Pool, int] = {"prefill": 1, "decode": 3}
    light = obs(itl=0.012, streams=4)  # 2 workers would run at 25% of capacity, ITL 20 ms projected
    reasons = [decode(policy.decide(t, light, current)).reason for t in range(0, 60, 10)]
    assert reasons == ["stabilizing"] * 6
    assert decode(policy.decide(35, obs(itl=0.04, streams=4), current)).reason == "within_target"  # breaks it
    for t in range(40, 100, 10):
        assert decode(policy.decide(t, light, current)).reason == "stabilizing"
    d = decode(policy.decide(100, light, current))
    assert (d.action, d.desired, d.reason) == ("scale_down", 2, "underloaded")  # one step at a time
    current = {"prefill": 1, "decode": 2}
    for t in range(101, 161, 10):  # the streak starts again after a change
        assert decode(policy.decide(t, light, current)).action == "hold"
    assert decode(policy.decide(161, light, current)).desired == 1
    assert decode(policy.decide(300, light, {"prefill": 1, "decode": 1})).reason == "at_min"


def test_no_shrink_when_the_projection_for_one_worker_less_misses_the_bar() -> None:
    policy = Policy(SETTINGS, PROFILE)
    # 9 streams on 3 workers: 3 each, 30 ms observed (slower than the profile's 23 ms); on 2 workers
    # 4.5 each, ×1.39 by the profile: 42 ms, over the bar 0.7 × 50 ms; the load alone would allow it
    for t in range(0, 200, 10):
        d = decode(policy.decide(t, obs(itl=0.03, streams=9), {"prefill": 1, "decode": 3}))
        assert (d.action, d.reason) == ("hold", "within_target"), d.detail
    assert "projected for 2 workers" in d.detail
    # without a profile the latency is projected in proportion to the load: 3/2 × 30 ms = 45 ms
    plain = Policy(SETTINGS, None)
    assert decode(plain.decide(0, obs(itl=0.03, streams=12), {"prefill": 1, "decode": 3})).reason == "within_target"


def test_no_shrink_when_the_remaining_workers_would_be_too_busy() -> None:
    d = decode(Policy(SETTINGS, PROFILE).decide(0, obs(itl=0.01, streams=10), {"prefill": 1, "decode": 2}))
    assert (d.action, d.reason) == ("hold", "within_target") and "125% of capacity" in d.detail


def test_an_idle_pool_shrinks_to_its_minimum_on_load_alone() -> None:
    policy = Policy(SETTINGS, None)
    current: dict[Pool, int] = {"prefill": 3, "decode": 2}
    for t in range(0, 60, 10):
        policy.decide(t, obs(), current)
    decisions = policy.decide(60, obs(), current)
    assert [(d.pool, d.action, d.desired) for d in decisions] == [("prefill", "scale_down", 2),
                                                                  ("decode", "scale_down", 1)]


def test_a_prefill_pool_with_minimum_zero_empties_only_when_idle() -> None:
    settings = replace(SETTINGS, min_prefill_workers=0, scale_down_delay_s=0, cooldown_s=0)
    policy = Policy(settings, PROFILE)
    busy = obs(ttft=0.05, prompt_tokens_per_s=20)
    assert prefill(policy.decide(0, busy, {"prefill": 1, "decode": 1})).reason == "within_target"
    d = prefill(policy.decide(1, obs(), {"prefill": 1, "decode": 1}))
    assert (d.action, d.desired) == ("scale_down", 0)
    d = prefill(policy.decide(2, busy, {"prefill": 0, "decode": 1}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 1, "prompt_load")


def test_bounds_are_restored_at_once_even_in_cooldown() -> None:
    policy = Policy(SETTINGS, None)
    policy.decide(0, obs(itl=1.0), {"prefill": 1, "decode": 1})  # decode scaled: cooldown
    decisions = policy.decide(1, obs(itl=1.0), {"prefill": 0, "decode": 9})
    assert [(d.action, d.desired, d.reason) for d in decisions] == [("scale_up", 1, "below_min"),
                                                                    ("scale_down", 6, "above_max")]
    assert decode(policy.decide(2, None, {"prefill": 1, "decode": 6})).reason == "no_data"


def test_the_pools_are_sized_independently() -> None:
    decisions = Policy(SETTINGS, PROFILE).decide(0, obs(ttft=0.9, itl=0.02, streams=4, prompt_tokens_per_s=500),
                                                 {"prefill": 1, "decode": 1})
    assert (prefill(decisions).action, prefill(decisions).reason) == ("scale_up", "ttft_over_target")
    assert decode(decisions).action == "hold"
    d = prefill(Policy(SETTINGS, PROFILE).decide(0, obs(ttft=0.1, prompt_tokens_per_s=2500),
                                                 {"prefill": 1, "decode": 1}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 3, "prompt_load")  # ceil(2.5 / 0.9)


def test_the_budget_cuts_the_least_urgent_growth_first() -> None:
    settings = replace(SETTINGS, max_total_workers=6)
    # decode misses its target by 4×, prefill by 1.2×: decode keeps its growth
    decisions = Policy(settings, None).decide(0, obs(ttft=0.6, itl=0.2), {"prefill": 2, "decode": 3})
    assert [(d.action, d.desired, d.reason) for d in decisions] == [("hold", 2, "budget"),
                                                                    ("scale_up", 4, "itl_over_target")]
    assert "budget 6 workers" in prefill(decisions).detail
    decisions = Policy(settings, PROFILE).decide(0, obs(ttft=0.9, itl=0.2, streams=40), {"prefill": 1, "decode": 1})
    assert sum(d.desired for d in decisions) == 6 and decode(decisions).desired == 5  # wanted 6, prefill kept 1


def test_a_device_budget_counts_each_worker_as_its_pools_degree() -> None:
    """Prefill workers of 2 ranks (tensor-parallel groups, 2 devices each), decode workers of 1, 8 devices: growth
    is cut where the devices run out although the worker budget has room."""
    settings = replace(SETTINGS, prefill_worker_devices=2, max_total_devices=8)
    # both pools miss their targets; decode (4x) keeps its growth, prefill's is cut to fit the devices
    decisions = Policy(settings, PROFILE).decide(0, obs(ttft=0.9, itl=0.2, streams=40, prompt_tokens_per_s=3000),
                                                 {"prefill": 2, "decode": 3})
    assert settings.devices({d.pool: d.desired for d in decisions}) <= 8
    assert decode(decisions).desired > 3 and prefill(decisions).reason == "budget"
    assert "budget 10 workers, 8 devices in all" in prefill(decisions).detail
    with pytest.raises(ValueError, match="max_total_devices must hold both pools' minimums"):
        replace(SETTINGS, prefill_worker_devices=4, min_prefill_workers=2, max_total_devices=8)


def test_a_move_between_pools_of_other_degrees_stays_within_the_devices() -> None:
    """A prefill worker of 2 devices is paid for with 2 decode workers of 1 device under a device budget."""
    settings = replace(MOVABLE, prefill_worker_devices=2, max_total_devices=9)
    policy = Policy(settings, PROFILE)
    starved = obs(ttft=5.0, itl=0.2, streams=2, prompt_tokens_per_s=4400)
    policy.decide(0, starved, {"prefill": 1, "decode": 7})
    decisions = policy.decide(10, starved, {"prefill": 1, "decode": 7})
    sizes = {d.pool: d.desired for d in decisions}
    assert prefill(decisions).reason == decode(decisions).reason == "rebalance", decisions
    # 1 x 2 + 7 = 9 devices. Decode, whose load grows as prefill lets more through, keeps 3 under its bar: it gives
    # 4 workers (4 devices) for 2 prefill workers (4 devices)
    assert sizes == {"prefill": 3, "decode": 3} and settings.devices(sizes) == 9
    assert "gives 4 to prefill (4 of decode's for 2 of prefill's devices)" in decode(decisions).detail


# a budget of 8 that either pool may nearly fill: the setting of bench.sim_planner
MOVABLE = replace(SETTINGS, max_prefill_workers=7, max_decode_workers=7, max_total_workers=8)


def test_the_budget_moves_workers_to_the_pool_the_load_needs() -> None:
    """1P:7D under long prompts: prefill needs 4.4 workers, decode 0.25, and both miss their
    targets (decode workers prefill for the starved pool). The first decision calls for a move, the
    next makes it: prefill takes 4 workers from decode at once, and the split then holds."""
    policy = Policy(MOVABLE, PROFILE)
    starved = obs(ttft=5.0, itl=0.2, streams=2, prompt_tokens_per_s=4400)
    first = prefill(policy.decide(0, starved, {"prefill": 1, "decode": 7}))
    assert (first.action, first.reason) == ("hold", "budget") and "a move of 4 from decode called for" in first.detail
    decisions = policy.decide(10, starved, {"prefill": 1, "decode": 7})
    assert [(d.action, d.desired, d.reason) for d in decisions] == [("scale_up", 5, "rebalance"),
                                                                    ("scale_down", 3, "rebalance")]
    assert "takes 4 from decode" in prefill(decisions).detail
    assert "load in workers' worth: prefill 4.40 on 1, decode 1.10 on 7" in prefill(decisions).detail
    served = obs(ttft=0.4, itl=0.02, streams=2, prompt_tokens_per_s=4400)
    for t in range(40, 600, 10):  # decode (0.25 workers' worth on 3) shrinks on its own, but never back
        for d in policy.decide(t, served, {"prefill": 5, "decode": 3}):
            assert d.action != "scale_up" and d.reason != "rebalance", d.line()


def test_no_move_without_a_profile_from_a_cooling_pool_or_on_one_decision() -> None:
    starved = obs(ttft=5.0, itl=0.2, streams=2, prompt_tokens_per_s=4400)
    decisions = Policy(MOVABLE, None).decide(0, starved, {"prefill": 1, "decode": 7})
    assert {d.reason for d in decisions} == {"budget", "at_max"}  # loads unknown: no split to move toward
    policy = Policy(MOVABLE, PROFILE)
    policy.decide(0, obs(itl=0.2, streams=40), {"prefill": 1, "decode": 6})  # decode grows to 7 at t=0
    assert [d.reason for d in policy.decide(10, starved, {"prefill": 1, "decode": 7})] == ["budget", "at_max"]
    assert prefill(policy.decide(30, starved, {"prefill": 1, "decode": 7})).reason == "budget"  # calls for it
    assert prefill(policy.decide(40, obs(), {"prefill": 1, "decode": 7})).reason == "at_min"  # a break
    assert prefill(policy.decide(50, starved, {"prefill": 1, "decode": 7})).reason == "budget"  # calls again
    assert prefill(policy.decide(60, starved, {"prefill": 1, "decode": 7})).reason == "rebalance"



def test_how_far_a_move_goes_and_what_a_move_back_needs() -> None:
    # prefill is 4.4x short, so the 5 streams seen decoding stand for 4.4x as many: 2.75 workers' worth.
    # Moving 4 would put decode at 92% of its capacity, over its growth bar: 3 move
    policy = Policy(MOVABLE, PROFILE)
    both = obs(ttft=5.0, itl=0.2, streams=5, prompt_tokens_per_s=4400)
    policy.decide(0, both, {"prefill": 1, "decode": 7})
    d = prefill(policy.decide(10, both, {"prefill": 1, "decode": 7}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 4, "rebalance")
    assert "decode 2.75 on 7 (0.62 seen decoding, x4.40 for the prefill pool's shortage)" in d.detail
    # then decode (4.5 workers' worth on 4) is short and prefill (2.7 on 4) has room: giving one would
    # leave prefill at 90% of decode's use, fine for a first move but not for undoing the last one
    decode_heavy = obs(ttft=0.3, itl=0.2, streams=36, prompt_tokens_per_s=2700)
    for t in (100, 110, 120):
        assert decode(policy.decide(t, decode_heavy, {"prefill": 4, "decode": 4})).reason == "budget"
    fresh = Policy(MOVABLE, PROFILE)
    fresh.decide(100, decode_heavy, {"prefill": 4, "decode": 4})
    d = decode(fresh.decide(110, decode_heavy, {"prefill": 4, "decode": 4}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 5, "rebalance")
    # a move back goes as far as the band allows: decode 7.5 workers' worth on 4, prefill 1.0 on 4; decode
    # wants 3 more, but 2 leave prefill at 50% against decode's 125%, a third at 100% against 107%
    back = obs(ttft=0.3, itl=0.2, streams=60, prompt_tokens_per_s=1000)
    policy.decide(130, back, {"prefill": 4, "decode": 4})
    d = decode(policy.decide(140, back, {"prefill": 4, "decode": 4}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 6, "rebalance")


def test_a_move_counts_the_decode_load_each_prefill_worker_more_lets_through() -> None:
    """Prefill is 3x short: the 16 streams seen decoding (2 workers' worth) would be 6 once all requests
    got through, more than 6 decode workers should carry; with one more prefill worker they are 4, which
    6 carry: one worker moves (all at the full 6 would block any move)."""
    policy = Policy(MOVABLE, PROFILE)
    short = obs(ttft=5.0, itl=0.2, streams=16, prompt_tokens_per_s=3000)
    policy.decide(0, short, {"prefill": 1, "decode": 7})
    d = prefill(policy.decide(10, short, {"prefill": 1, "decode": 7}))
    assert (d.action, d.desired, d.reason) == ("scale_up", 2, "rebalance"), d.line()


def test_each_move_is_called_for_twice_even_without_a_cooldown() -> None:
    policy = Policy(replace(MOVABLE, cooldown_s=0), PROFILE)
    short = obs(ttft=5.0, itl=0.2, streams=16, prompt_tokens_per_s=3000)
    reasons = [prefill(policy.decide(t, short, {"prefill": 1 + t // 20, "decode": 7 - t // 20})).reason
               for t in (0, 10, 20, 30)]
    assert reasons == ["budget", "rebalance", "budget", "rebalance"]


@pytest.mark.parametrize("budget", [8, 20, 40, 100])
def test_pools_equally_loaded_near_their_growth_bar_move_rarely_and_never_back(budget: int) -> None:
    """Both pools at 88% of their capacity, with noise on each load per window that shrinks as the
    cluster (and its request count) grows (±30% at 8 workers): most windows one pool or the other
    wants to grow and the budget cuts it, but a move needs the receiver short of capacity twice in
    a row with the giver less used, and a move back needs the giver at 2/3 of the receiver's use."""
    settings = replace(MOVABLE, max_prefill_workers=budget - 1, max_decode_workers=budget - 1,
                       max_total_workers=budget)
    noise, half, moves = 0.3 * math.sqrt(8 / budget), budget // 2, []
    for seed in range(5):
        policy, rng, size = Policy(settings, PROFILE), random.Random(seed), {"prefill": half, "decode": half}
        for t in range(0, 3600, 10):
            streams, prompt = (1 + rng.uniform(-noise, noise), 1 + rng.uniform(-noise, noise))
            seen = obs(itl=0.04, ttft=0.4, streams=0.88 * 8 * half * streams, prompt_tokens_per_s=880 * half * prompt)
            for d in policy.decide(t, seen, size):
                if d.action != "hold":
                    assert d.reason == "rebalance", d.line()
                    size[d.pool] = d.desired
                    if d.action == "scale_up":
                        moves.append((seed, d.pool))
    for seed in range(5):
        assert len({pool for s, pool in moves if s == seed}) <= 1, f"moved back: {moves}"
    assert len(moves) <= 5, f"{len(moves)} moves in 5 hours of steady load: {moves}"


@pytest.mark.parametrize(("start", "streams", "prompt_tokens_per_s", "first_move"), [
    ((1, 7), 2, 4400, (5, 3)),  # long prompts: toward prefill
    ((1, 7), 12, 4400, (6, 2)),  # long prompts and streams: decode's load is underestimated while prefill starves
    ((7, 1), 40, 1000, (2, 6)),  # long streams: toward decode
])
def test_a_bad_split_under_a_binding_budget_moves_one_way_and_settles(
        start: tuple[int, int], streams: float, prompt_tokens_per_s: float, first_move: tuple[int, int]) -> None:
    """Both pools' sizes change monotonically, the first decision moves the budget to the split of
    the load-based needs, everything has settled within an hour, and both targets are then met."""
    cluster = SyntheticCluster(1.0, noise=0.1, seed=int(streams), prefill=start[0], decode=start[1], fallback=True)
    policy = Policy(MOVABLE, PROFILE)
    history: list[tuple[float, Pool, int]] = []
    for t in range(0, 3600 * 2, 10):
        for d in sorted(policy.decide(t, cluster.observe(streams, prompt_tokens_per_s), cluster.size),
                        key=lambda d: d.action != "scale_down"):
            if d.action != "hold":
                history.append((t, d.pool, d.desired))
                cluster.size[d.pool] = d.desired
        assert sum(cluster.size.values()) <= MOVABLE.max_total_workers
    for pool in POOLS:
        moves = [n for _, p, n in history if p == pool]
        assert moves in (sorted(moves), sorted(moves, reverse=True)), f"{pool} went up and down: {history}"
    assert all(t < 3600 for t, _, _ in history), f"still changing after an hour: {history}"
    assert sorted(history[:2], key=lambda h: h[1], reverse=True) == [(10, "prefill", first_move[0]),
                                                                      (10, "decode", first_move[1])], history
    final = cluster.observe(streams, prompt_tokens_per_s)
    assert final.ttft_s is not None and final.ttft_s <= SETTINGS.ttft_target_s * 1.1
    assert final.itl_s is not None and final.itl_s <= SETTINGS.itl_target_s * 1.1


class SyntheticCluster:
    """A cluster whose latency follows a fixed curve of the load per worker (times `slowness`
    against the profile, with noise), and whose pools resize as soon as the planner asks. With
    `fallback`, a prefill pool short of its load makes the decode workers prefill for it: the decode
    ITL rises with the prefill shortage as well as with the streams, and the streams seen decoding
    fall with it (requests wait in the prefill queue: the planner's decode load counts only streams
    past their first token)."""

    def __init__(self, slowness: float, noise: float, seed: int, prefill: int = 1, decode: int = 1,
                 fallback: bool = False) -> None:
        self.slowness, self.noise, self.rng, self.fallback = slowness, noise, random.Random(seed), fallback
        self.size: dict[Pool, int] = {"prefill": prefill, "decode": decode}

    def observe(self, streams: float, prompt_tokens_per_s: float) -> Observation:
        def jitter() -> float:
            return 1 + self.rng.uniform(-self.noise, self.noise)
        busy = prompt_tokens_per_s / self.size["prefill"] / 1000.0
        ttft = 0.1 / (1 - busy) if busy < 1 else 10.0
        if self.fallback and busy > 1:
            streams /= busy  # the share of requests the prefill pool lets through
        itl = PROFILE.decode_itl_s(streams / self.size["decode"], 0.9)
        assert itl is not None
        if self.fallback:
            itl += 0.2 * max(busy - 0.9, 0.0)  # fallback prefills between decode steps
        return obs(itl=itl * self.slowness * jitter(), streams=streams * jitter(), ttft=ttft * self.slowness * jitter(),
                   prompt_tokens_per_s=prompt_tokens_per_s * jitter())


@pytest.mark.parametrize("profile", [PROFILE, None], ids=["profile", "no-profile"])
@pytest.mark.parametrize("slowness", [1.0, 1.8], ids=["as-profiled", "slower-than-profiled"])
@pytest.mark.parametrize(("streams", "prompt_tokens_per_s"), [(3, 300), (20, 1500), (45, 2600)])
@pytest.mark.parametrize("start", ["smallest", "largest"])
def test_no_oscillation_on_steady_load(profile: CapacityProfile | None, slowness: float, streams: float,
                                       prompt_tokens_per_s: float, start: str) -> None:
    """Steady load (with ±10% noise), from the smallest or the largest pools: each pool moves one
    way only, settles within an hour of decisions, then holds for another hour."""
    sizes = (1, 1) if start == "smallest" else (4, 6)
    cluster = SyntheticCluster(slowness, noise=0.1, seed=int(streams), prefill=sizes[0], decode=sizes[1])
    policy = Policy(SETTINGS, profile)
    history: list[tuple[float, Pool, int]] = []
    for t in range(0, 3600 * 2, 10):
        for d in policy.decide(t, cluster.observe(streams, prompt_tokens_per_s), cluster.size):
            if d.action != "hold":
                history.append((t, d.pool, d.desired))
                cluster.size[d.pool] = d.desired
    for pool in ("prefill", "decode"):
        moves = [n for _, p, n in history if p == pool]
        assert moves in (sorted(moves), sorted(moves, reverse=True)), f"{pool} went up and down: {history}"
    assert all(t < 3600 for t, _, _ in history), f"still changing after an hour: {history}"
    settled = cluster.observe(streams, prompt_tokens_per_s)
    for pool in ("prefill", "decode"):  # and the targets are met where the bounds allow it
        met = (settled.latency_s(pool) or 0) <= SETTINGS.target_s(pool) * 1.1
        assert met or cluster.size[pool] == SETTINGS.bounds(pool).max, (pool, cluster.size, settled)


def test_a_ramp_up_and_down_returns_to_the_minimum() -> None:
    cluster, policy = SyntheticCluster(1.0, noise=0.05, seed=1), Policy(SETTINGS, PROFILE)
    sizes = []
    for t, streams in enumerate([2] * 30 + [40] * 60 + [2] * 60):
        for d in policy.decide(t * 10, cluster.observe(streams, 100), cluster.size):
            if d.action != "hold":
                cluster.size[d.pool] = d.desired
        sizes.append(cluster.size["decode"])
    assert max(sizes) >= 5 and sizes[-1] == 1
    peak = sizes.index(max(sizes))
    assert sizes[:peak + 1] == sorted(sizes[:peak + 1]) and sizes[peak:] == sorted(sizes[peak:], reverse=True)


def test_profile_arithmetic_and_json_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert PROFILE.decode_itl_s(0.5, 0.9) == pytest.approx(0.01)  # below the first point: the first point's
    assert PROFILE.decode_itl_s(6, 0.9) == pytest.approx(0.04)
    assert PROFILE.decode_itl_s(24, 0.9) == pytest.approx(0.15)  # extrapolated along the last segment
    assert PROFILE.decode_itl_s(6, 0.5) == pytest.approx(0.032)  # the nearest recorded quantile
    assert PROFILE.decode_streams_within(0.04, 0.9) == pytest.approx(6.0)
    assert PROFILE.decode_streams_within(1.0, 0.9) == pytest.approx(16.0)  # all meet it: the largest batch
    assert PROFILE.decode_streams_within(0.005, 0.9) == pytest.approx(0.5)  # none does
    path = tmp_path / "profile.json"
    PROFILE.save(path)
    assert CapacityProfile.load(path) == PROFILE
    with pytest.raises(ValueError, match="version"):
        CapacityProfile.from_json('{"version": 99}')
    with pytest.raises(ValueError, match="ascending"):
        CapacityProfile(decode=(PROFILE.decode[1], PROFILE.decode[0]))


@pytest.mark.parametrize("bad", [
    dict(scale_down_utilization=0.9, scale_up_utilization=0.8), dict(min_decode_workers=0),
    dict(max_decode_workers=0), dict(max_total_workers=1, min_prefill_workers=1), dict(latency_quantile=1.0),
    dict(planner_window_s=1, planner_interval_s=5), dict(itl_target_s=0)])
def test_settings_are_validated(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        PlannerSettings(**bad)
