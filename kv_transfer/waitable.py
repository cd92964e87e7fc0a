"""A thread-safe queue that threads and asyncio tasks can both wait on, with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class WaitableQueue(Generic[T]):
    """Items or one terminal error. After `fail(err)`, pending and later gets raise `err` once the
    items queued before it are consumed."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._wake()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, event in self._async_waiters:
            loop.call_soon_threadsafe(event.set)

    def _take(self) -> tuple[bool, T | None]:
        if self._items:
            return True, self._items.popleft()
        if self._error is not None:
            raise self._error
        return False, None

    def get(self, timeout: float, what: str) -> T:
        """Block until an item arrives; raises TimeoutError naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ready, item = self._take()
                if ready:
                    return item  # type: ignore[return-value]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timeout(what, timeout)
                self._cond.wait(left)

    async def get_async(self, timeout: float, what: str) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        event = asyncio.Event()
        entry = (loop, event)
        with self._cond:
            self._async_waiters.append(entry)
        try:
            while True:
                with self._cond:
                    ready, item = self._take()
                    if ready:
                        return item  # type: ignore[return-value]
                    event.clear()
                left = deadline - loop.time()
                if left <= 0:
                    raise _timeout(what, timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            with self._cond:
                self._async_waiters.remove(entry)


def _timeout(what: str, timeout: float) -> BaseException:
    from kv_transfer.errors import TransferTimeoutError

    return TransferTimeoutError(f"{what} did not complete within {timeout:.3g} s")
