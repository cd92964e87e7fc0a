"""Where an `engine.step()` spends its time: timers wrapped around the engine's parts, never edits to them.

Timed parts: `scheduler.schedule`, `runner.prepare`, the model (`model.forward`, `model.sampling_logits`
and a CUDA-graph replay where the runner has one) and `runner.sampler(...)`. The rest of the step is
commit/detokenize plus the runner's glue. Every wrapper is removed on exit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine

PARTS = ("schedule", "prepare", "forward", "sample")


@dataclass(frozen=True)
class StepProfile:
    batch_size: int
    decode_steps: int
    step_ms: float  # mean wall time of one engine.step()
    forward_ms: float  # mean model forward + logits
    forward_share: float
    outside_share: float  # 1 - forward_share = the sum of the four shares below
    schedule_share: float
    prepare_share: float
    sample_share: float
    other_share: float  # commit, detokenize and runner glue: the step minus every timed part


class _SamplerProxy:
    """Stands in for `runner.sampler`: `__call__` is looked up on the type, so it cannot be patched."""

    def __init__(self, sampler: Any, timed_call: Callable[..., Any]) -> None:
        self._sampler = sampler
        self._timed_call = timed_call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed_call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


class StepProfiler:
    """Use as a context manager; bracket each step with `begin_step()` / `end_step(seconds)`."""

    def __init__(self, engine: LLMEngine, sync: Callable[[], None]) -> None:
        self._engine = engine
        self._sync = sync
        self._current = dict.fromkeys(PARTS, 0.0)
        self._totals = dict.fromkeys((*PARTS, "step"), 0.0)
        self._steps = 0
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> StepProfiler:
        runner, model = self._engine.runner, self._engine.parts.model
        self._patch(self._engine.scheduler, "schedule", "schedule")
        self._patch(runner, "prepare", "prepare")
        self._patch(model, "forward", "forward")
        self._patch(model, "sampling_logits", "forward")
        graphs = getattr(runner, "graphs", None)
        if graphs is not None:
            self._patch(graphs, "run", "forward")
        sampler = runner.sampler
        runner.sampler = _SamplerProxy(sampler, self._timed(sampler.__call__, "sample"))  # type: ignore[assignment]
        self._undo.append(lambda: setattr(runner, "sampler", sampler))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            self._undo.pop()()

    def _timed(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self._current[part] += time.perf_counter() - started
        return timed

    def _patch(self, owner: object, name: str, part: str) -> None:
        own = vars(owner)
        had_own, previous = name in own, own.get(name)
        setattr(owner, name, self._timed(getattr(owner, name), part))

        def undo() -> None:
            if had_own:
                setattr(owner, name, previous)
            else:
                delattr(owner, name)
        self._undo.append(undo)

    def begin_step(self) -> None:
        self._current = dict.fromkeys(PARTS, 0.0)

    def end_step(self, step_seconds: float, counted: bool) -> None:
        """Close the step; only `counted` steps (pure decode steps) enter the totals."""
        if not counted:
            return
        for part in PARTS:
            self._totals[part] += self._current[part]
        self._totals["step"] += step_seconds
        self._steps += 1

    def result(self, batch_size: int) -> StepProfile:
        if self._steps == 0:
            raise RuntimeError("no decode step was profiled: give more than one output token")
        t = self._totals
        share = {part: t[part] / t["step"] for part in PARTS}
        outside = 1.0 - share["forward"]
        return StepProfile(
            batch_size=batch_size, decode_steps=self._steps, step_ms=1e3 * t["step"] / self._steps,
            forward_ms=1e3 * t["forward"] / self._steps, forward_share=share["forward"],
            outside_share=outside,
            schedule_share=share["schedule"], prepare_share=share["prepare"], sample_share=share["sample"],
            other_share=outside - share["schedule"] - share["prepare"] - share["sample"])


@dataclass(frozen=True)
class AsyncStepProfile:
    """Decode steps with async scheduling (engine.step_pipeline): per step, the forward thread's busy time
    (forward and sampling) and the engine thread's time split by whether a forward ran meanwhile."""

    batch_size: int
    decode_steps: int
    step_ms: float  # mean wall time of one engine.step() call (one step launched and one committed)
    forward_ms: float  # forward thread busy: model and sampler
    overlapped_ms: float  # detokenize, outputs, schedule and build inputs while a forward ran
    waiting_ms: float  # the engine thread blocked on the forward
    serial_ms: float  # commit, launch, and any scheduling with nothing in flight
    exposed_share: float  # 1 - forward / step: what the overlap left outside the forward


class AsyncStepProfiler:
    """Like StepProfiler, for an engine with async scheduling: bracket each step with begin_step/end_step."""

    def __init__(self, engine: LLMEngine) -> None:
        if engine.pipeline is None:
            raise ValueError("the engine does not schedule asynchronously (async_scheduling=True)")
        self._engine = engine
        self._pipeline = engine.pipeline
        self._busy = 0.0
        self._start = self._stats()
        self._totals = dict.fromkeys(("step", "forward", "overlapped", "waiting", "serial"), 0.0)
        self._steps = 0
        self._undo: Callable[[], None] = lambda: None

    def _stats(self) -> tuple[float, float, float, float]:
        s = self._pipeline.stats
        return self._busy, s.overlapped_s, s.waiting_s, s.serial_s

    def __enter__(self) -> AsyncStepProfiler:
        runner = self._engine.runner
        run = runner.execute_prepared

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self._busy += time.perf_counter() - started
        runner.execute_prepared = timed  # type: ignore[method-assign]
        self._undo = lambda: delattr(runner, "execute_prepared")
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo()

    def begin_step(self) -> None:
        self._start = self._stats()

    def end_step(self, step_seconds: float, counted: bool) -> None:
        if not counted:
            return
        now = self._stats()
        for key, before, after in zip(("forward", "overlapped", "waiting", "serial"), self._start, now, strict=True):
            self._totals[key] += after - before
        self._totals["step"] += step_seconds
        self._steps += 1

    def result(self, batch_size: int) -> AsyncStepProfile:
        if self._steps == 0:
            raise RuntimeError("no decode step was profiled: give more than one output token")
        t, n = self._totals, self._steps
        return AsyncStepProfile(batch_size, n, 1e3 * t["step"] / n, 1e3 * t["forward"] / n,
                                1e3 * t["overlapped"] / n, 1e3 * t["waiting"] / n, 1e3 * t["serial"] / n,
                                1.0 - t["forward"] / t["step"])
