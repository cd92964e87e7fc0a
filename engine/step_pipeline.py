"""Async scheduling: the next step is scheduled and its inputs built, and the last step's tokens detokenized
and turned into outputs, while a step's forward runs on another thread (vLLM's `--async-scheduling`).

One `step()` call:
  1. wait for the step in flight (N) and commit its tokens by the token rules alone (end and stop tokens,
     the length limit), which free an ended sequence's blocks at once;
  2. launch the step prepared while N ran (N+1), its awaited input tokens filled in;
  3. detokenize N's tokens, search their stop strings and make N's outputs,   } while N+1 runs
  4. schedule N+2 and build its inputs, as if N+1 had ended.                  }
A sequence that ends on a sampled token (or a stop string) is known one step late: the step after computes
one row for it in vain (not sampled where the end is known at launch), and it holds its blocks and a place in
that step's budget, so batches differ from the plain step's: tokens are the same only where a row's result does
not depend on its batch (fp32 here; bf16 on oneDNN does not promise it).

Invariants: at most one step is in flight, and at most one prepared; the prepared one was scheduled after the
one in flight was marked (`Scheduler.mark_in_flight`) and before it was committed; a request's tokens are
texted before the next step's are committed (so a stop string ends it exactly where the plain step would).
Steps run in order on one thread, so blocks freed while a step runs are written again only by later steps. Not
so for a block freed at a commit, before the next step launches: that step may still write it (a row in vain),
so second-tier loads into blocks admitted by a schedule run only at a launch or a quiesce, with nothing in flight.
Whatever else touches the engine's state first calls `quiesce()`: nothing in flight, nothing prepared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from engine.model_runner import ModelRunner, SequenceResult, StepInputs
from engine.openmp import hand_over, take_back
from engine.outputs import RequestOutput
from engine.request_state import RequestState
from engine.scheduler import SchedulerOutput
from engine.sequence import SequenceStatus

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

T = TypeVar("T")


@dataclass
class OverlapStats:
    """Seconds of the engine thread's step work, split by whether a forward ran meanwhile."""

    overlapped_s: float = 0.0  # detokenizing, making outputs, scheduling and building inputs during a forward
    waiting_s: float = 0.0  # blocked on the forward in flight
    serial_s: float = 0.0  # the rest: committing, launching, and scheduling while nothing is in flight
    preempted_in_flight: int = 0  # sequences preempted by the next step's schedule while their step ran


class StepPipeline:
    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        if not isinstance(engine.runner, ModelRunner):
            raise ValueError("async scheduling needs the model runner (engine.model_runner.ModelRunner)")
        self._runner = engine.runner
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tandem-forward")
        self._handed_over = hand_over()  # the building thread's OpenMP team: the forward thread's now
        self._in_flight: tuple[SchedulerOutput, Future[dict[str, SequenceResult]]] | None = None
        self._prepared: tuple[SchedulerOutput, StepInputs] | None = None
        self._untexted: list[RequestState] = []  # requests whose committed tokens are not texted yet
        self._ready: list[RequestOutput] = []  # outputs made by `quiesce`, returned by the next step
        self.stats = OverlapStats()

    @property
    def busy(self) -> bool:
        """True while a step is in flight or prepared, or outputs are still to come."""
        return bool(self._in_flight or self._prepared or self._untexted or self._ready)

    def step(self) -> list[RequestOutput]:
        started, waited = time.perf_counter(), self.stats.waiting_s
        if self._in_flight is not None:
            self._commit_in_flight()
        prepared, self._prepared = self._prepared, None
        if prepared is None:  # nothing ran ahead: schedule now, with nothing to overlap
            prepared = self._schedule()
        if prepared is not None:
            self._launch(*prepared)
        overlap_from = time.perf_counter()
        outputs = self.take_ready() + self._emit()
        if self._in_flight is not None:
            self._prepared = self._schedule()
        ended = time.perf_counter()
        overlapped = ended - overlap_from if self._in_flight is not None else 0.0
        self.stats.overlapped_s += overlapped
        self.stats.serial_s += ended - started - overlapped - (self.stats.waiting_s - waited)
        return outputs

    def close(self) -> None:
        """Stop: the step in flight runs out unread (the engine steps no more), the forward thread ends, and the
        building thread gets its OpenMP threads back (when called on it)."""
        self._prepared = None
        self._in_flight = None
        self._executor.shutdown(wait=True)
        take_back(self._handed_over)

    def run_whole(self, run: Callable[[], T]) -> T:
        """Run a whole step's forward (`run`) on the forward thread, which alone holds an OpenMP team
        (engine.openmp); nothing may be in flight."""
        assert self._in_flight is None and self._prepared is None, "quiesce first"
        return self._executor.submit(run).result()

    def quiesce(self) -> list[RequestOutput]:
        """Finish the step in flight and drop the prepared one (the blocks it reserved stay with their
        sequences, whose state the next schedule plans from); returns every output not yet returned."""
        self._prepared = None
        outputs = self.take_ready() + self._emit()  # the committed step's text first, then the next step's tokens
        if self._in_flight is not None:
            self._commit_in_flight()
            outputs += self._emit()
        self._engine.run_staged_loads()  # the dropped step's admissions keep their blocks: they must hold their KV
        return outputs

    def take_ready(self) -> list[RequestOutput]:
        ready, self._ready = self._ready, []
        return ready

    def take_ready_of(self, request_id: str) -> list[RequestOutput]:
        """Remove and return the kept outputs of one request (in order)."""
        mine = [out for out in self._ready if out.request_id == request_id]
        self._ready = [out for out in self._ready if out.request_id != request_id]
        return mine

    def keep_ready(self, outputs: list[RequestOutput]) -> None:
        """Outputs a quiesce made inside an engine call that returns something else: the next step returns them."""
        self._ready += outputs

    # -- the parts ------------------------------------------------------------------------------------------
    def _schedule(self) -> tuple[SchedulerOutput, StepInputs] | None:
        engine = self._engine
        plan = engine.scheduler.schedule()
        return None if plan.is_empty else (plan, self._runner.prepare(plan))

    def _launch(self, plan: SchedulerOutput, inputs: StepInputs) -> None:
        engine = self._engine
        inputs = self._runner.fill_awaited(inputs)
        engine.run_staged_loads()  # nothing is in flight: no forward writes a block they land in
        engine.scheduler.mark_in_flight(plan)
        engine.num_steps += 1
        engine.num_computed_tokens_total += plan.num_tokens
        self._in_flight = (plan, self._executor.submit(self._timed_forward, plan, inputs))

    def _timed_forward(self, plan: SchedulerOutput, inputs: StepInputs) -> dict[str, SequenceResult]:
        started = time.perf_counter()
        results = self._runner.execute_prepared(inputs)
        self._engine.forward_ended()
        self._engine.prefill_cost.observe(plan, time.perf_counter() - started)
        return results

    def _commit_in_flight(self) -> None:
        assert self._in_flight is not None
        plan, future = self._in_flight
        self._in_flight = None
        waited_from = time.perf_counter()
        try:
            results = future.result()
        except BaseException:
            self._undo_in_flight(plan)
            raise
        finally:
            self.stats.waiting_s += time.perf_counter() - waited_from
        engine = self._engine
        for item in plan.scheduled:
            seq = item.seq
            if seq.is_finished:  # ended while this step ran (a stop string) or by the step before: a row in vain
                continue
            if seq.status is SequenceStatus.WAITING:
                self.stats.preempted_in_flight += 1
            req = engine.requests[seq.request_id]
            result = results.get(seq.request_id)
            accepted: list[int] = []
            ended = False
            if result is not None:
                if result.prompt_logprobs:
                    req.add_prompt_logprobs(result.prompt_logprobs_start, result.prompt_logprobs)
                accepted, ended = req.take_tokens(result.token_ids, result.logprobs, texted=False)
            engine.scheduler.commit(item, accepted)
            if ended:
                engine.scheduler.finish(seq, seq.finish_reason or "stop")
            if accepted or ended:
                self._untexted.append(req)

    def _undo_in_flight(self, plan: SchedulerOutput) -> None:
        """The step failed: its sequences are as before it was marked, and the step prepared after it is dropped,
        so a retried `step()` schedules from a consistent state (as a failed plain step leaves it)."""
        self._prepared = None
        for item in plan.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            seq.awaiting_token = False  # preempted meanwhile too: its token never comes
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed_tokens = item.start

    def _emit(self) -> list[RequestOutput]:
        engine = self._engine
        outputs = []
        while self._untexted:  # one at a time: an error leaves the rest for a retry
            req = self._untexted.pop(0)
            seq = req.seq
            if req.catch_up_text() and not seq.is_finished:
                engine.scheduler.finish(seq, "stop")
            if seq.is_finished:
                req.release_held_text()
            outputs.append(req.output())
            if seq.is_finished:
                del engine.requests[seq.request_id]
        return outputs
