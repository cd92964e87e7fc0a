"""A submitted batch and its handle: status, deadline, waiting, release."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kv_transfer.datatypes import BatchStatus, Ranges, SegmentDescriptor, TransferOp
from kv_transfer.errors import TransferError, TransferTimeoutError
from kv_transfer.segment import LocalSegment

# Batch ids are unique per process (a random prefix, then a counter): peers see (initiator, id).
_ID_PREFIX = uuid.uuid4().hex[:8] + "-"
_ID_COUNTER = itertools.count()


@dataclass(frozen=True)
class NotifySpec:
    """What the peer receives when the batch ends: a tag it can wait on and an opaque message."""

    tag: str = ""
    message: bytes = b""


NO_NOTIFY = NotifySpec()  # the peer still learns the batch ended, with an empty tag and message


@dataclass(eq=False)
class Batch:
    """One batch towards one remote segment through one backend. Completes exactly once.

    Invariant: `status` leaves PENDING once, through `complete()` or `fail()`, and a failed
    batch never reports DONE afterwards (late completions are ignored).
    """

    op: TransferOp
    local: LocalSegment
    remote: SegmentDescriptor
    ranges: Ranges
    notify: NotifySpec
    backend: str
    timeout_s: float
    batch_id: str = field(default_factory=lambda: f"{_ID_PREFIX}{next(_ID_COUNTER):x}")
    submitted_at: float = field(default_factory=time.monotonic)
    status: BatchStatus = BatchStatus.PENDING
    error: TransferError | None = None
    finished_at: float | None = None
    on_release: Callable[[], None] | None = None  # backend resources to free with the handle
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _callbacks: list[Callable[[Batch], None]] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.submitted_at + self.timeout_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def complete(self) -> bool:
        return self._finish(BatchStatus.DONE, None)

    def fail(self, error: TransferError) -> bool:
        return self._finish(BatchStatus.FAILED, error)

    def _finish(self, status: BatchStatus, error: TransferError | None) -> bool:
        with self._lock:
            if self.status is not BatchStatus.PENDING:
                return False
            self.status, self.error, self.finished_at = status, error, time.monotonic()
            callbacks = list(self._callbacks)
        self._done.set()
        for callback in callbacks:
            callback(self)
        return True

    def add_done_callback(self, callback: Callable[[Batch], None]) -> None:
        with self._lock:
            if self.status is BatchStatus.PENDING:
                self._callbacks.append(callback)
                return
        callback(self)

    def expire_if_overdue(self, now: float) -> bool:
        if now < self.deadline:
            return False
        return self.fail(TransferTimeoutError(
            f"batch {self.batch_id} ({self.op.value} {self.ranges.total_bytes} bytes, segment "
            f"{self.remote.name!r} of {self.remote.owner}, {self.backend}) missed its {self.timeout_s:.3g} s deadline"))


class BatchHandle:
    """What `submit` returns: one or more sub-batches (one per remote segment and op). Poll
    `status`, or `wait` / `await wait_async`; `release` when done."""

    def __init__(self, batches: list[Batch]) -> None:
        self._batches = batches
        self._released = False

    @property
    def batch_ids(self) -> list[str]:
        return [b.batch_id for b in self._batches]

    @property
    def backends(self) -> list[str]:
        return [b.backend for b in self._batches]

    @property
    def status(self) -> BatchStatus:
        """FAILED if any sub-batch failed, DONE when all are done, else PENDING."""
        statuses = {b.status for b in self._batches}
        if BatchStatus.FAILED in statuses:
            return BatchStatus.FAILED
        return BatchStatus.PENDING if BatchStatus.PENDING in statuses else BatchStatus.DONE

    @property
    def error(self) -> TransferError | None:
        return next((b.error for b in self._batches if b.error is not None), None)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every sub-batch is done; raises the first error, or TransferTimeoutError when
        `timeout` (or a batch's own deadline) passes first."""
        until = None if timeout is None else time.monotonic() + timeout
        for batch in self._batches:
            left = batch.remaining() if until is None else min(until - time.monotonic(), batch.remaining())
            if not batch._done.wait(max(left, 0.0)):
                batch.expire_if_overdue(time.monotonic())
                if batch.status is BatchStatus.PENDING:
                    raise TransferTimeoutError(f"batch {batch.batch_id} still running after {timeout:.3g} s")
            self._raise_if_failed()

    async def wait_async(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + timeout
        for batch in self._batches:
            future: asyncio.Future[None] = loop.create_future()

            def wake(_: Batch, future: asyncio.Future[None] = future) -> None:
                loop.call_soon_threadsafe(_resolve, future)

            batch.add_done_callback(wake)
            left = batch.remaining() if until is None else min(until - loop.time(), batch.remaining())
            try:
                await asyncio.wait_for(future, max(left, 0.0))
            except TimeoutError:
                batch.expire_if_overdue(time.monotonic())
                if batch.status is BatchStatus.PENDING:
                    raise TransferTimeoutError(f"batch {batch.batch_id} still running after {timeout:.3g} s") from None
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        error = self.error
        if error is not None:
            raise error

    def release(self) -> None:
        """Free backend resources. Releasing a pending batch abandons it (it fails, never DONE)."""
        if self._released:
            return
        self._released = True
        for batch in self._batches:
            if batch.status is BatchStatus.PENDING:
                batch.fail(TransferError(f"batch {batch.batch_id} was released before it completed"))
            if batch.on_release is not None:
                batch.on_release()

    def __enter__(self) -> BatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
