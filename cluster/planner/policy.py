"""The planner's policy: from one observation and the pools' current sizes, the desired size of
each pool. Pure apart from its memory (per pool: last scaling, start of the comfortable streak; and
the move between pools the last decision called for); time is passed in, so tests drive it with
synthetic observations.

Each pool is sized on its own signal: prefill on TTFT and prompt tokens/s, decode on ITL and
concurrent streams, each against the load one worker carries at the target (PoolModel).

  grow    latency over target → one more worker; load over scale_up_utilization of the pool's
          capacity → as many as the load needs (the larger of the two; a missed target is named
          the reason when there is one)
  shrink  by one, only when, for scale_down_delay_s without a break, the latency is under
          scale_down_latency_ratio of the target both now and as projected for one worker less,
          and the remaining workers would carry under scale_down_utilization of their capacity
  always  cooldown_s after a pool was scaled it is left alone; sizes stay within the pool's
          bounds (a size outside them is corrected at once); growth that would take the total
          past max_total_workers is cut, the least urgent pool's first
  move    when growth was cut by the budget and the profile knows both pools' loads, workers move
          from the other pool to the one that wanted them (no more than it wanted), if two
          decisions in a row call for it. After the move the giver stays under its growth bar and
          its utilization (load-based need per worker) under the receiver's, times the band
          scale_down_utilization / scale_up_utilization, or times 1 (toward equal use) when the
          receiver lacks capacity for its load and the move does not undo the last one. Both are
          then in cooldown. Latency does not enter it: a decode pool over its ITL target because
          its workers prefill for a starved prefill pool (the fallback) is a symptom of the prefill
          shortage. The decode load is then scaled up by that shortage (streams past their first
          token are only those the prefill pool let through)

No oscillation on steady load: growing needs the pool over its target, shrinking needs the pool
as it would be after shrinking under a lower bar (the utilization and latency bands), so a load
that made a pool grow from n to n+1 projects above the bar for n and never shrinks it back. A move
leaves the giver less used than the receiver, and undoing it needs the reverse with the giver at
2/3 (the default band) of the receiver's use: the ratio of the two pools' loads must shift by 1.5x
(tests: two pools equally used near their growth bar, under noise, move rarely and never back).
The projection scales the observed latency by the profile's ratio between the two loads per worker,
so a cluster slower than its profile by a constant factor is projected right too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from cluster.planner.capacity import CapacityProfile
from cluster.planner.observation import Observation
from cluster.planner.pool_model import PoolModel
from cluster.planner.settings import POOLS, PlannerSettings, Pool

Action = Literal["scale_up", "scale_down", "hold"]
Reason = Literal[
    "below_min", "above_max",  # bounds, corrected at once
    "ttft_over_target", "itl_over_target", "prompt_load", "stream_load",  # scale_up
    "underloaded",  # scale_down
    "rebalance",  # scale_up of one pool with scale_down of the other: the budget moved between them
    "no_data", "within_target", "stabilizing", "cooldown", "at_max", "at_min", "budget",  # hold
]
_LATENCY_REASON: dict[Pool, Reason] = {"prefill": "ttft_over_target", "decode": "itl_over_target"}
_LOAD_REASON: dict[Pool, Reason] = {"prefill": "prompt_load", "decode": "stream_load"}
_EPS = 1e-9  # a load of exactly k workers' worth needs k, not k + 1


@dataclass(frozen=True)
class Decision:
    pool: Pool
    current: int
    desired: int
    action: Action
    reason: Reason
    detail: str  # the numbers behind the reason
    observation: Observation | None
    urgency: float = 0.0  # latency / target (or load / capacity): who keeps growth when the budget is short

    def line(self) -> str:
        seen = self.observation.describe() if self.observation is not None else "no observation"
        return (f"{self.pool} {self.current}->{self.desired} {self.action} reason={self.reason} "
                f"({self.detail}) {seen}")


def by_current(decisions: list[Decision], pool: Pool) -> int:
    """The pool's size when the decisions were made."""
    return next(d.current for d in decisions if d.pool == pool)


@dataclass
class _PoolMemory:
    last_scaled_at: float | None = None
    comfortable_since: float | None = None  # start of the unbroken streak of shrinkable observations


class Policy:
    def __init__(self, settings: PlannerSettings, profile: CapacityProfile | None) -> None:
        self.settings = settings
        self.models = {pool: PoolModel(pool, profile, settings.target_s(pool), settings.latency_quantile)
                       for pool in POOLS}
        self._memory = {pool: _PoolMemory() for pool in POOLS}
        self._move_asked: Pool | None = None  # the pool the last decision would have moved workers to
        self._last_move: Pool | None = None  # the pool the last move between pools gave workers to

    def decide(self, now: float, observation: Observation | None, current: Mapping[Pool, int]) -> list[Decision]:
        """One decision per pool (prefill, decode); the caller applies those that are not holds."""
        proposals = [self._propose(pool, now, observation, current[pool]) for pool in POOLS]
        decisions = self._rebalance(now, observation, proposals, self._within_budget(proposals))
        for d in decisions:
            if d.action != "hold":
                self._memory[d.pool] = _PoolMemory(last_scaled_at=now)
        return decisions

    def _propose(self, pool: Pool, now: float, obs: Observation | None, n: int) -> Decision:
        s, memory, model = self.settings, self._memory[pool], self.models[pool]
        bounds = s.bounds(pool)

        streak, memory.comfortable_since = memory.comfortable_since, None  # kept only on the way to shrinking

        def decision(desired: int, action: Action, reason: Reason, detail: str, urgency: float = 0.0) -> Decision:
            return Decision(pool, n, desired, action, reason, detail, obs, urgency)

        if n < bounds.min:
            return decision(bounds.min, "scale_up", "below_min", f"min={bounds.min}")
        if n > bounds.max:
            return decision(bounds.max, "scale_down", "above_max", f"max={bounds.max}")
        if obs is None:
            return decision(n, "hold", "no_data", "no whole window observed yet")
        target, latency, load = s.target_s(pool), obs.latency_s(pool), obs.load(pool)
        need = model.workers_needed(load)
        cooling = self._cooling(pool, now)
        facts = (f"target={target:.4f}s q{s.latency_quantile:g}="
                 f"{'none' if latency is None else f'{latency:.4f}s'} load={load:.2f} "
                 f"capacity/worker={'unknown' if model.capacity is None else f'{model.capacity:.2f}'}")

        wish, reason = n, None  # growth; a missed target is the reason even when the load asks for more
        if need is not None and math.ceil(need / s.scale_up_utilization - _EPS) > wish:
            wish, reason = math.ceil(need / s.scale_up_utilization - _EPS), _LOAD_REASON[pool]
        if latency is not None and latency > target:
            wish, reason = max(wish, n + 1), _LATENCY_REASON[pool]
        if reason is not None:
            urgency = max(latency / target if latency is not None else 0.0, (need or 0.0) / max(n, 1))
            if n >= bounds.max:
                return decision(n, "hold", "at_max", f"wants {wish}; {facts}", urgency)
            if cooling:
                return decision(n, "hold", "cooldown", f"wants {wish}; {facts}", urgency)
            return decision(min(wish, bounds.max), "scale_up", reason, facts, urgency)

        if n <= bounds.min:
            return decision(n, "hold", "at_min", facts)
        why_not = self._why_not_shrink(pool, obs, n)
        if why_not is not None:
            return decision(n, "hold", "within_target", f"{why_not}; {facts}")
        memory.comfortable_since = now if streak is None else streak
        if now - memory.comfortable_since < s.scale_down_delay_s:
            return decision(n, "hold", "stabilizing",
                            f"comfortable for {now - memory.comfortable_since:.0f}s; {facts}")
        if cooling:
            return decision(n, "hold", "cooldown", f"wants {n - 1}; {facts}")
        return decision(n - 1, "scale_down", "underloaded", facts)

    def _why_not_shrink(self, pool: Pool, obs: Observation, n: int) -> str | None:
        """None if the pool, one worker smaller, would stay comfortably under its target."""
        s, model = self.settings, self.models[pool]
        load, latency = obs.load(pool), obs.latency_s(pool)
        bar = s.scale_down_latency_ratio * s.target_s(pool)
        need = model.workers_needed(load)
        if n == 1:  # to none (a prefill pool may be empty: decode workers prefill themselves)
            return None if load <= 0 else f"the last worker has load {load:.2f}"
        if need is not None and need / (n - 1) > s.scale_down_utilization:
            return f"{n - 1} workers would run at {need / (n - 1):.0%} of capacity"
        if latency is None:
            return None  # no traffic to judge by: the load alone decides
        if latency > bar:
            return f"latency {latency:.4f}s over the scale-down bar {bar:.4f}s"
        projected = latency * model.latency_factor(load / n, load / (n - 1))
        if projected > bar:
            return f"latency projected for {n - 1} workers {projected:.4f}s over the scale-down bar {bar:.4f}s"
        return None

    def _within_budget(self, proposals: list[Decision]) -> list[Decision]:
        """Cut growth (least urgent pool first) until the total fits max_total_workers and max_total_devices
        (a worker holds its pool's devices: a tensor-parallel group is one replica of its degree); growth to a
        pool's minimum is never cut (the minimums fit the budget, PlannerSettings checks it)."""
        settings = self.settings
        wanted = {d.pool: d.desired for d in proposals}
        result = {d.pool: d for d in proposals}
        for d in sorted((d for d in proposals if d.action == "scale_up" and d.reason != "below_min"),
                        key=lambda d: d.urgency):
            while wanted[d.pool] > d.current and settings.over_budget(wanted):
                wanted[d.pool] -= 1
            if wanted[d.pool] == d.desired:
                continue
            desired = wanted[d.pool]
            budget_note = f"budget {self._budget()} in all; {d.detail}"
            result[d.pool] = (replace(d, desired=desired, detail=budget_note) if desired > d.current
                              else replace(d, desired=d.current, action="hold", reason="budget",
                                           detail=f"wants {d.desired}; {budget_note}"))
        return [result[pool] for pool in POOLS]

    def _budget(self) -> str:
        s = self.settings
        return f"{s.max_total_workers} workers" + (f", {s.max_total_devices} devices" if s.max_total_devices else "")

    def _rebalance(self, now: float, obs: Observation | None, proposals: list[Decision],
                   decisions: list[Decision]) -> list[Decision]:
        """Move workers to a pool whose growth the budget cut, from the other pool, while the giver
        stays well below the receiver's utilization (see the module's `move`)."""
        asked, self._move_asked = self._move_asked, None
        if obs is None:
            return decisions
        wanted = {p.pool: p.desired - d.desired for p, d in zip(proposals, decisions, strict=True)}
        needs = {pool: self.models[pool].workers_needed(obs.load(pool)) for pool in POOLS}
        prefilling, starved = by_current(decisions, "prefill"), needs["prefill"]
        decode_seen, shortage = needs["decode"], 1.0
        if decode_seen is not None and starved is not None and 0 < prefilling < starved:
            # the decode load counts streams past their first token: a prefill pool short of its load lets
            # through prefilling / needed of the requests, and the rest will decode too once prefilled
            shortage = starved / prefilling
            needs["decode"] = decode_seen * shortage

        def giver_need(giver: Pool, need: float, k: int) -> float:
            """The giver's load after k of its workers moved: decode's grows as prefill lets more through."""
            if giver == "decode" and shortage > 1 and decode_seen is not None:
                return decode_seen * min(shortage, (prefilling + k) / prefilling)
            return need

        up = self.settings.scale_up_utilization
        band = self.settings.scale_down_utilization / up
        by_pool = {d.pool: d for d in decisions}
        for receiver in POOLS:
            giver = next(pool for pool in POOLS if pool != receiver)
            r, g = by_pool[receiver], by_pool[giver]
            need_r, need_g = needs[receiver], needs[giver]
            if (wanted[receiver] <= 0 or need_r is None or need_g is None or need_r <= 0
                    or g.action == "scale_up" or self._cooling(giver, now)):
                continue
            # after the move the giver stays under its own growth bar and under the receiver's utilization: times
            # the band (down / up) always; times 1 (toward equal use) when the receiver lacks capacity for its
            # load and the move does not undo the last one
            ratio = 1.0 if need_r > r.desired and self._last_move != giver else band
            spare = g.desired - self.settings.bounds(giver).min
            k = min(wanted[receiver], spare)
            while k > 0 and (self._given(k, receiver, giver) > spare
                             or not self._fits(giver_need(giver, need_g, k),
                                               g.desired - self._given(k, receiver, giver),
                                               min(up, ratio * need_r / (r.desired + k)))
                             or self.settings.over_budget({receiver: r.desired + k,
                                                           giver: g.desired - self._given(k, receiver, giver)})):
                k -= 1
            if k <= 0:
                continue
            if asked != receiver:  # one window's noise: a move must be called for by two decisions in a row
                self._move_asked = receiver
                by_pool[receiver] = replace(r, detail=f"a move of {k} from {giver} called for (made if the next "
                                                      f"decision calls for it too); {r.detail}")
                break
            described = {pool: f"{pool} {needs[pool]:.2f} on {by_pool[pool].desired}" for pool in POOLS}
            if shortage > 1:
                described["decode"] += (f" ({decode_seen:.2f} seen decoding, x{shortage:.2f} for the prefill "
                                        f"pool's shortage)")
            loads = (f"budget {self._budget()}; load in workers' worth: {described[receiver]}, "
                     f"{described[giver]}")
            gives = self._given(k, receiver, giver)
            trade = "" if gives == k else f" ({gives} of {giver}'s for {k} of {receiver}'s devices)"
            by_pool[receiver] = replace(r, desired=r.desired + k, action="scale_up", reason="rebalance",
                                        detail=f"takes {k} from {giver}{trade}; {loads}")
            by_pool[giver] = replace(g, desired=g.desired - gives, action="scale_down", reason="rebalance",
                                     detail=f"gives {gives} to {receiver}{trade}; {loads}")
            self._last_move = receiver
            break  # the pools' total (in devices) is unchanged or less, so one move per decision is the whole rebalance
        return [by_pool[pool] for pool in POOLS]

    def _given(self, k: int, receiver: Pool, giver: Pool) -> int:
        """Workers the giver gives for k of the receiver's: k, or as many devices under a device budget."""
        if not self.settings.max_total_devices:
            return k
        return -(-k * self.settings.worker_devices(receiver) // self.settings.worker_devices(giver))

    @staticmethod
    def _fits(need: float, workers: int, utilization: float) -> bool:
        """`need` (workers' worth of load) on `workers` stays at or under `utilization` (none: only no load)."""
        return need <= utilization * workers

    def _cooling(self, pool: Pool, now: float) -> bool:
        last = self._memory[pool].last_scaled_at
        return last is not None and now - last < self.settings.cooldown_s
