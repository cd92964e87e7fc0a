"""asyncio front of the engine: the compute loop runs in its own thread, never on the event loop.

Everything that touches the engine's state runs on that thread, between two steps, as a command;
callers use the typed methods below (and `remote_kv`, engine.async_remote_kv), never the engine
itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.block_manager import KVCacheEvents
from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineDeadError, InvalidRequestError
from engine.kv_cache import KVCachePool
from engine.kv_groups import KVGroups
from engine.kv_hooks import KVStepHook, KVStorageAllocator
from engine.kv_offload import KVOffloadTier
from engine.llm_engine import LLMEngine
from engine.openmp import hand_over, take_back
from engine.outputs import EngineStats, EngineStatus, RequestOutput
from engine.parallel.protocol import RankPlugin
from engine.parallel.shard import group_kv_heads
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request: EngineRequest


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    quiesce: bool = True  # False: fn only reads what a step in flight leaves consistent (async scheduling)


_STOP = object()
T = TypeVar("T")
Outputs = asyncio.Queue[RequestOutput | BaseException]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class AsyncEngine:
    """`async for out in await engine.add_request(engine.make_request(id, prompt, params))` streams a
    request's outputs; `await engine.abort(id)` cancels it and frees its blocks."""

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 kv_storage: KVStorageAllocator | None = None, rank_plugin: RankPlugin | None = None) -> None:
        from engine.async_remote_kv import AsyncRemoteKV

        self._owns_engine = engine is None
        self._llm = engine or LLMEngine(config, kv_storage=kv_storage, rank_plugin=rank_plugin)
        # the model runs on the engine thread: its OpenMP team must be the process's only one (engine.openmp)
        self._handed_over = hand_over()
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Outputs]] = {}
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._kv_listener: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # see notify_kv_events
        self.remote_kv = AsyncRemoteKV(self)
        if self._llm.offload is not None:  # its writer thread makes blocks readable between steps too
            self._llm.offload.on_events = self._wake_kv_listener
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    # -- what never changes after start -----------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self._llm.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self._llm.config

    @property
    def model_config(self) -> ModelConfig:
        return self._llm.model_config

    @property
    def weights_fingerprint(self) -> str:
        """engine.loader.fingerprint of the loaded weights: KV peers must share it."""
        return self._llm.parts.weights_fingerprint

    @property
    def max_model_len(self) -> int:
        return self._llm.max_model_len

    @property
    def kv_pool(self) -> KVCachePool:
        """The paged KV pool (for a KV connector to register as a transfer segment)."""
        return self._llm.kv_pool

    async def rank_command(self, body: object, wait: bool = True) -> list[object]:
        """Hand `body` to the RankServices of every tensor-parallel rank past 0 (engine.parallel.leader's
        TPLeader.command); their replies in rank order. Nothing to hand it to with one rank."""
        leader = self._llm.parts.tp_leader
        if leader is None:
            return []
        sent = asyncio.ensure_future(asyncio.to_thread(leader.command, body, wait))
        try:
            return await asyncio.shield(sent)
        except asyncio.CancelledError:  # the thread goes on: let its frame go out before whatever undoes it
            with contextlib.suppress(Exception):
                await sent
            raise

    def send_rank_command(self, body: object) -> None:
        """`rank_command` without waiting for replies (from any thread; a lost rank is not an error here)."""
        leader = self._llm.parts.tp_leader
        if leader is not None and leader.lost is None:
            with contextlib.suppress(EngineDeadError):
                leader.command(body, wait=False)

    @property
    def tensor_parallel_group_heads(self) -> tuple[tuple[int, int], ...]:
        """Every rank's (first KV head, count) of the model (engine.parallel.shard.group_kv_heads)."""
        return group_kv_heads(self.model_config, self.config.tensor_parallel_size)

    def on_rank_lost(self, callback: Callable[[str], None]) -> bool:
        """Call `callback(why)` (on a watcher thread) if a tensor-parallel rank of this engine exits; False: one rank
        (nothing to watch)."""
        leader = self._llm.parts.tp_leader
        if leader is not None:
            leader.on_lost.append(callback)
            if leader.lost is not None:  # lost before anyone listened (while the worker was being built)
                callback(leader.lost)
        return leader is not None

    @property
    def kv_groups(self) -> KVGroups:
        """How the model's layers share the pool's blocks (engine.kv_groups)."""
        return self._llm.parts.kv_groups

    @property
    def prefill_seconds_per_token(self) -> float:
        """The engine's moving average of prefill seconds per prompt token (0.0: none measured yet)."""
        return self._llm.prefill_cost.seconds_per_token

    @property
    def kv_tier(self) -> KVOffloadTier | None:
        """The second KV tier, if any (its methods say which may be called from any thread)."""
        return self._llm.offload

    async def hold_tier_loads(self, blocks: Sequence[tuple[int, tuple[int, ...]]]) -> list[int]:
        """KVOffloadTier.hold_for_load on the engine thread (it may evict); [] without a tier."""
        return await self._call(lambda llm: [] if llm.offload is None else llm.offload.hold_for_load(blocks),
                                quiesce=False)

    # -- requests ---------------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                     priority: int = 0, resume_token_ids: Sequence[int] | None = None,
                     cache_salt: str = "") -> EngineRequest:
        """Validate a request once, where it enters (InvalidRequestError says what to change)."""
        return self._llm.make_request(request_id, prompt, params, priority, resume_token_ids, cache_salt)

    async def add_request(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Enqueue a validated request; returns its stream (a duplicate id raises here)."""
        outputs = self._open_stream(request.request_id)
        with self._lock:
            self._raise_if_dead()
            self._commands.put(_Add(request))
        return self._stream(request.request_id, outputs)

    async def generate(self, request: EngineRequest) -> RequestOutput:
        """The final output of one request."""
        final = None
        async for out in await self.add_request(request):
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
        return await self._call(abort)

    # -- observation and plumbing ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters read now, from any thread, without waiting for the engine: each is exact when read
        (during a step, running sequences are the step's), though together they may straddle a step."""
        return self._llm.stats()

    async def status(self) -> EngineStatus:
        """Counters and the pool's integrity, read on the engine thread between two steps."""
        return await self._call(lambda e: EngineStatus(e.stats(), e.integrity_error()), quiesce=False)

    async def drain_kv_events(self, with_snapshot: bool = False) -> KVCacheEvents:
        """Prefix-cache changes since the last drain (needs config.record_kv_events)."""
        return await self._call(lambda e: e.drain_kv_events(with_snapshot), quiesce=False)

    def has_kv_events(self) -> bool:
        """Whether `drain_kv_events` has changes to return, read now from any thread without waiting for the
        engine (a change made meanwhile is seen by the next call)."""
        return self._llm.has_kv_events

    def notify_kv_events(self, event: asyncio.Event) -> None:
        """Set `event` (on the calling loop) once `has_kv_events` may be true: now if it is, else after the
        next step that records a change. One-shot: call again after each wake-up."""
        with self._lock:
            self._kv_listener = (asyncio.get_running_loop(), event)
        if self.has_kv_events():  # armed first, then read: a change made meanwhile wakes it from either side
            self._wake_kv_listener()

    def _wake_kv_listener(self) -> None:
        with self._lock:
            listener, self._kv_listener = self._kv_listener, None
        if listener is not None:
            loop, event = listener
            with contextlib.suppress(RuntimeError):  # its loop closed (the hub stopped): nobody to wake
                loop.call_soon_threadsafe(event.set)

    async def set_kv_hook(self, hook: KVStepHook | None) -> None:
        """Plug a KV connector's step hook in (engine.kv_hooks), between two steps."""
        await self._call(lambda e: e.set_kv_hook(hook))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout)
        take_back(self._handed_over)  # in the reverse order of the hand-overs (the engine's pipeline made one first)
        if self._owns_engine and not self._thread.is_alive():
            self._llm.close()

    # -- for engine.async_remote_kv ---------------------------------------------------------------------
    def _open_stream(self, request_id: str) -> Outputs:
        outputs: Outputs = asyncio.Queue()
        with self._lock:  # the engine thread marks itself dead under this lock: no stream is left unanswered
            self._raise_if_dead()
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        return outputs

    def _close_stream(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")

    async def _call(self, fn: Callable[[LLMEngine], T], quiesce: bool = True) -> T:
        """Run `fn(engine)` on the engine thread between two steps (the only safe place to touch
        the engine's state), with no step in flight unless `quiesce` is False (async scheduling; see
        LLMEngine.quiesce); its exception is raised here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._raise_if_dead()
            self._commands.put(_Call(fn, loop, future, quiesce))
        return await future

    async def _stream(self, request_id: str, outputs: Outputs) -> AsyncIterator[RequestOutput]:
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
        # with async scheduling, only adds and reads that a step in flight leaves consistent meet one
        if command.quiesce if isinstance(command, _Call) else not isinstance(command, _Add):
            for out in self._llm.quiesce():
                self._deliver(out.request_id, out, last=out.finished)
        if isinstance(command, _Add):
            try:
                self._llm.add_request(command.request)
            except Exception as exc:
                self._deliver(command.request.request_id, exc, last=True)
        elif isinstance(command, _Call):
            try:
                result, error = command.fn(self._llm), None
            except Exception as exc:
                result, error = None, exc
            command.loop.call_soon_threadsafe(_settle, command.future, result, error)
        elif isinstance(command, _Abort):
            final = self._llm.abort_request(command.request_id)
            if final is not None:
                self._deliver(command.request_id, final, last=True)
        return True

    def _next_command(self) -> object | None:
        """The next command; waits while there is nothing to step (at most until detached blocks expire)."""
        if self._llm.has_unfinished_requests():
            try:
                return self._commands.get_nowait()
            except queue.Empty:
                return None
        try:
            return self._commands.get(timeout=self._llm.remote_kv.seconds_to_next_expiry())
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            while True:
                command = self._next_command()
                if command is not None:
                    if not self._apply(command):
                        return
                    while True:  # drain everything queued before stepping
                        try:
                            command = self._commands.get_nowait()
                        except queue.Empty:
                            break
                        if not self._apply(command):
                            return
                for out in self._llm.step():
                    self._deliver(out.request_id, out, last=out.finished)
                if self._kv_listener is not None and self._llm.has_kv_events:  # re-read under the lock
                    self._wake_kv_listener()
        except BaseException as exc:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
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
