"""The driver's view of a Tandem cluster on Ray: every server actor, by component, kept at the count
asked for, like a ReplicaSet per pool. It is also the planner's actuator for Ray (cluster.planner.
actuator.Actuator): growing a pool creates worker actors, shrinking drains the newest ones.

Failures: an actor whose process dies is restarted by Ray in place (`max_restarts`); its new
incarnation (a new worker or store id, pid, maybe node) is announced when it serves. An actor Ray
gave up on (restarts used up, killed for good) is replaced by a new actor at once; further replacements
of that component wait `replace_backoff_s`, doubled for each replacement in a row that died
before it served (up to `max_backoff_s`). Shrinking and stopping drain first (health NOT_SERVING, etcd
record revoked, in-flight requests finish), then kill the actor without restart.

Every method is called from one thread (the driver's main loop); none blocks, except
`wait_ready` and `stop`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster.planner.settings import Pool
from cluster.ray_backend.actor import Component, ServerInfo

log = logging.getLogger(__name__)

NewActor = Callable[[Component, str], Any]  # (component, actor name) → a started actor's handle
Announce = Callable[["Member"], None]  # a member's server is serving (a new incarnation)


@dataclass(eq=False)
class Member:
    component: Component
    name: str
    handle: Any  # ray.actor.ActorHandle of a ServerActor
    info: ServerInfo | None = None  # its current incarnation, once it served
    poll: Any = None  # ObjectRef of an info() call in flight
    next_poll_at: float = 0.0
    drain: Any = None  # ObjectRef of its drain(), once told to leave: then it is no longer serving
    drain_deadline: float = 0.0


class ActorFleet:
    def __init__(self, new_actor: NewActor, announce: Announce, drain_timeout_s: float,
                 poll_interval_s: float = 1.0, replace_backoff_s: float = 5.0, max_backoff_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._new_actor, self._announce = new_actor, announce
        self.drain_timeout_s, self.poll_interval_s = drain_timeout_s, poll_interval_s
        self.replace_backoff_s, self.max_backoff_s = replace_backoff_s, max_backoff_s
        self._clock = clock
        self._failed_starts: dict[Component, int] = {}  # replacements in a row that died before serving
        self._serial = itertools.count()
        self._members: list[Member] = []  # oldest first
        self._desired: dict[Component, int] = {}
        self._replace_at: dict[Component, float] = {}  # no replacement of this component before then
        self.replaced = 0  # actors Ray gave up on that were replaced

    # -- sizes ---------------------------------------------------------------------------------------
    def members(self) -> list[Member]:
        """Every actor not yet stopped: serving, starting, restarting or draining."""
        return list(self._members)

    def serving(self, component: Component | None = None) -> list[Member]:
        """Members not told to leave (starting or restarting ones included), oldest first."""
        return [m for m in self._members if m.drain is None and component in (None, m.component)]

    def start(self, counts: Mapping[Component, int]) -> None:
        for component, count in counts.items():
            self._desired[component] = count
            for _ in range(count):
                self._add(component)

    def current_replicas(self, pool: Pool) -> int:
        return len(self.serving(pool))

    def scale(self, pool: Pool, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        self._desired[pool] = replicas
        serving = self.serving(pool)
        for _ in range(replicas - len(serving)):
            self._add(pool)
        for member in reversed(serving[replicas:]):  # the newest leave first
            self._start_drain(member)

    # -- the driver's loop ---------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        """Every member serves; raises RuntimeError (with the actor's error) if one failed to start,
        the time ran out, or `stop` was set."""
        import ray

        deadline = self._clock() + timeout_s
        pending = {m.handle.info.remote(): m for m in self.serving() if m.info is None}
        while pending:
            if stop is not None and stop.is_set():
                raise RuntimeError("stopped while the actors were starting")
            if self._clock() > deadline:
                names = ", ".join(m.name for m in pending.values())
                raise RuntimeError(f"actors {names} did not start within {timeout_s} s (still loading, or no "
                                   "node has the resources they need: `ray status`)")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                member = pending.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise RuntimeError(f"actor {member.name} failed to start: {_cause(e)}") from None
                self._serves(member, info)

    def supervise(self) -> None:
        """Announce new incarnations, replace actors Ray gave up on, finish drains."""
        import ray

        now = self._clock()
        for member in self.serving():
            if member.poll is None and now >= member.next_poll_at:
                member.poll = member.handle.info.remote()
        polls = {m.poll: m for m in self.serving() if m.poll is not None}
        done, _ = ray.wait(list(polls), num_returns=len(polls), timeout=0) if polls else ([], [])
        for ref in done:
            member = polls[ref]
            member.poll, member.next_poll_at = None, now + self.poll_interval_s
            try:
                info = ray.get(ref)
            except ray.exceptions.ActorDiedError as e:
                self._lost(member, e)
                continue
            except ray.exceptions.RayError as e:  # restarting (ActorUnavailableError) or a passing failure
                log.debug("actor %s: %s", member.name, type(e).__name__)
                continue
            if info != member.info:
                self._serves(member, info)
        self._finish_drains(now)
        for component, desired in self._desired.items():
            if len(self.serving(component)) < desired and now >= self._replace_at.get(component, 0.0):
                self.replaced += 1
                log.warning("replacing a %s actor (%d replaced so far)", component, self.replaced)
                self._add(component)
                backoff = self.replace_backoff_s * 2 ** self._failed_starts.get(component, 0)
                self._replace_at[component] = now + min(backoff, self.max_backoff_s)

    def stop(self, first: Iterable[Component] = ("router",), last: Iterable[Component] = ("kvstore",)) -> None:
        """Drain everything: the `first` components, then the rest together, then the `last` ones (each
        wave once the one before it drained or timed out); then kill every actor."""
        import ray

        first, last = tuple(first), tuple(last)
        for wave in ([m for m in self.serving() if m.component in first],
                     [m for m in self.members() if m.component not in first + last],  # drains under way too
                     [m for m in self.members() if m.component in last]):
            for member in wave:
                self._start_drain(member)
            refs = [m.drain for m in wave]
            if refs:  # the actor's own drain gives up after drain_timeout_s: a margin to hear its answer
                ray.wait(refs, num_returns=len(refs), timeout=self.drain_timeout_s + 5.0)
        self._finish_drains(float("inf"))
        self._desired.clear()

    # -- internals -----------------------------------------------------------------------------------
    def _add(self, component: Component) -> Member:
        name = f"{component}-{next(self._serial)}"
        member = Member(component, name, self._new_actor(component, name))
        self._members.append(member)
        log.info("created actor %s", name)
        return member

    def _serves(self, member: Member, info: ServerInfo) -> None:
        self._failed_starts[member.component] = 0
        if member.info is not None:
            log.warning("actor %s was restarted: pid %d -> %d on node %s", member.name, member.info.pid, info.pid,
                        info.node_id[:8])
        member.info = info
        self._announce(member)

    def _lost(self, member: Member, error: Exception) -> None:
        import ray

        log.error("actor %s is gone for good: %s", member.name, _cause(error))
        ray.kill(member.handle, no_restart=True)  # "died" may still be restarted (a preempted node): not untracked
        self._members.remove(member)
        if member.info is None:
            self._failed_starts[member.component] = self._failed_starts.get(member.component, 0) + 1

    def _start_drain(self, member: Member) -> None:
        if member.drain is None:
            log.info("draining actor %s", member.name)
            member.drain = member.handle.drain.remote(self.drain_timeout_s)
            member.drain_deadline = self._clock() + self.drain_timeout_s + 5.0

    def _finish_drains(self, now: float) -> None:
        import ray

        for member in [m for m in self._members if m.drain is not None]:
            done, _ = ray.wait([member.drain], timeout=0)
            if done or now >= member.drain_deadline:
                ray.kill(member.handle, no_restart=True)
                self._members.remove(member)
                drained = bool(done) and _succeeded(done[0])
                log.info("actor %s %s", member.name, "drained and stopped" if drained else "killed (drain failed or "
                         "timed out)")


def _cause(error: Exception) -> str:
    """The line of a Ray error that names its cause (after the traceback of an exception raised in
    the actor's constructor, the exception itself)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _succeeded(drain_ref: Any) -> bool:
    """Whether a finished drain() call reports the server stopped in time."""
    import ray

    try:
        return bool(ray.get(drain_ref, timeout=0))
    except ray.exceptions.RayError:
        return False
