"""asyncio front of the engine: the compute loop runs in its own thread, never on the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.engine_config import EngineConfig
from engine.errors import EngineDeadError, InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampler import TokenLogprobs
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    priority: int
    resume_token_ids: list[int]


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_STOP = object()
T = TypeVar("T")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class AsyncEngine:
    """`async for out in await engine.add_request(id, prompt, params)` streams a request's outputs;
    `await engine.abort(id)` cancels it and frees its blocks."""

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        self.engine = engine or LLMEngine(config)
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]] = {}
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                          priority: int = 0, resume_token_ids: list[int] | None = None
                          ) -> AsyncIterator[RequestOutput]:
        """Validate and enqueue a request (InvalidRequestError is raised here, before any stream).
        `resume_token_ids`: see LLMEngine.add_request (a migrated request)."""
        params = params or SamplingParams()
        resumed = list(resume_token_ids or ())
        if resumed:
            self.engine.validate_resume(self.engine.encode_prompt(prompt), params, resumed)
        token_ids, outputs = self._open_stream(request_id, prompt)
        with self._lock:
            self._raise_if_dead()
            self._commands.put(_Add(request_id, token_ids, params, priority, resumed))
        return self._stream(request_id, outputs)

    def _open_stream(self, request_id: str, prompt: str | list[int]
                     ) -> tuple[list[int], asyncio.Queue[RequestOutput | BaseException]]:
        token_ids = self.engine.encode_prompt(prompt)
        self.engine._validate_prompt(token_ids)
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:  # the engine thread marks itself dead under this lock: no stream is left unanswered
            self._raise_if_dead()
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        return token_ids, outputs

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps (the only safe place to touch
        the engine's state); its exception is raised here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._raise_if_dead()
            self._commands.put(_Call(fn, loop, future))
        return await future

    # -- remote prefill (decode role) -------------------------------------------------------------------
    async def reserve_remote_prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                                     priority: int = 0) -> tuple[list[int], AsyncIterator[RequestOutput]]:
        """Reserve KV blocks for a prompt another engine prefills (see
        `LLMEngine.add_remote_prefill_request`); returns the block ids and the request's stream,
        which starts once `finish_remote_prefill` or `prefill_locally` is called. Leaving the
        stream early aborts the request and frees its blocks, parked or not."""
        token_ids, outputs = self._open_stream(request_id, prompt)
        try:
            blocks = await self.call(lambda e: e.add_remote_prefill_request(request_id, token_ids, params, priority))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return blocks, self._stream(request_id, outputs)

    async def finish_remote_prefill(self, request_id: str, first_token_id: int,
                                    logprobs: TokenLogprobs | None = None, num_cached_tokens: int = 0) -> None:
        def finish(engine: LLMEngine) -> None:
            out = engine.finish_remote_prefill(request_id, first_token_id, logprobs, num_cached_tokens)
            self._deliver(request_id, out, last=out.finished)
        await self.call(finish)

    async def prefill_locally(self, request_id: str) -> None:
        await self.call(lambda e: e.prefill_locally(request_id))

    async def _stream(self, request_id: str, outputs: asyncio.Queue[RequestOutput | BaseException]
                      ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (cancelled, closed): free the request's blocks
                self._commands.put(_Abort(request_id))

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
                       ) -> RequestOutput:
        """The final output of one request."""
        final = None
        async for out in await self.add_request(request_id, prompt, params):
            final = out
        assert final is not None and final.finished
        return final

    async def abort(self, request_id: str) -> bool:
        """Abort a request and return once the engine has (between two steps, so no step is still
        using its blocks); True if it was live. Its stream, if any, ends with finish reason abort."""
        def abort(engine: LLMEngine) -> bool:
            final = engine.abort_request(request_id)
            if final is not None:
                self._deliver(request_id, final, last=True)
            return final is not None
        return await self.call(abort)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException, last: bool) -> None:
        with self._lock:
            target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _apply(self, command: object) -> bool:
        if command is _STOP:
            return False
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.token_ids, command.params, command.priority,
                                        command.resume_token_ids)
            except Exception as exc:
                self._deliver(command.request_id, exc, last=True)
        elif isinstance(command, _Call):
            try:
                result, error = command.fn(self.engine), None
            except Exception as exc:
                result, error = None, exc
            command.loop.call_soon_threadsafe(_settle, command.future, result, error)
        elif isinstance(command, _Abort):
            final = self.engine.abort_request(command.request_id)
            if final is not None:
                self._deliver(command.request_id, final, last=True)
        return True

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                try:
                    command = self._commands.get(block=block)
                    if not self._apply(command):
                        return
                    while True:  # drain everything queued before stepping
                        if not self._apply(self._commands.get_nowait()):
                            return
                except queue.Empty:
                    pass
                for out in self.engine.step():
                    self._deliver(out.request_id, out, last=out.finished)
        except BaseException as exc:
            log.exception("engine loop died")
            with self._lock:
                self._dead = exc
                streams, self._streams = self._streams, {}
            dead = EngineDeadError(f"engine loop died: {exc!r}")
            for loop, outputs in streams.values():
                loop.call_soon_threadsafe(outputs.put_nowait, dead)
            while True:  # calls queued before the death would otherwise wait forever
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Call):
                    command.loop.call_soon_threadsafe(_settle, command.future, None, dead)
