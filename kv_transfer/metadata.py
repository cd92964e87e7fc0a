"""Where segment descriptors are published: etcd in a cluster, an in-process store in unit tests.

Keys are `<prefix>/segments/<name>`. The etcd store attaches every key to one lease that a
background task keeps alive, so the descriptors of a process that dies vanish after the TTL, and
`close()` revokes the lease so they vanish at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from kv_transfer.errors import MetadataStoreError

log = logging.getLogger(__name__)
T = TypeVar("T")


class MetadataStore(Protocol):
    async def put(self, key: str, value: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


def segment_key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/segments/{name}"


class InProcessStore:
    """A store living in this process only (unit tests, single-process set-ups)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> None:
        self._data[key] = value

    async def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        self._data.clear()


class EtcdStore:
    """etcd v3 through aetcd. Every call has a deadline; failures raise MetadataStoreError naming
    the endpoint and the key."""

    def __init__(self, endpoint: str, lease_ttl_s: int = 10, timeout_s: float = 5.0) -> None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
        if lease_ttl_s < 2:
            raise ValueError("etcd's minimum lease TTL is 2 s")
        self.endpoint = endpoint
        self._host, self._port = host, int(port)
        self._ttl = lease_ttl_s
        self._timeout = timeout_s
        self._client = None
        self._lease = None
        self._keepalive: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def _connected(self, key: str):  # -> aetcd.Client
        import aetcd

        async with self._lock:
            if self._client is None:
                client = aetcd.Client(self._host, self._port, timeout=self._timeout,
                                      connect_wait_timeout=max(int(self._timeout), 1))
                await self._call(client.connect(), "connect", key)
                self._client = client
            return self._client

    async def _call(self, coro, what: str, key: str):
        try:
            return await bounded(coro, self._timeout)
        except Exception as e:
            raise MetadataStoreError(
                f"etcd at {self.endpoint} is unreachable or failed ({what} {key!r}): {type(e).__name__}: {e}") from e

    async def _ensure_lease(self, client, key: str):
        if self._lease is None:
            self._lease = await self._call(client.lease(self._ttl), "lease grant for", key)
            self._keepalive = asyncio.create_task(self._keep_alive(), name="etcd-segment-lease")
        return self._lease

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                assert self._lease is not None
                await bounded(self._lease.refresh(), self._timeout)
            except Exception as e:  # keep trying: the key expires only if etcd stays away for a TTL
                log.warning("refreshing the segment lease at %s failed: %s", self.endpoint, e)

    async def put(self, key: str, value: bytes) -> None:
        client = await self._connected(key)
        lease = await self._ensure_lease(client, key)
        await self._call(client.put(key.encode(), value, lease=lease), "put", key)

    async def get(self, key: str) -> bytes | None:
        client = await self._connected(key)
        result = await self._call(client.get(key.encode()), "get", key)
        return None if result is None else bytes(result.value)

    async def delete(self, key: str) -> None:
        client = await self._connected(key)
        await self._call(client.delete(key.encode()), "delete", key)

    async def close(self) -> None:
        """Revoke the lease (the descriptors vanish now) and close the client, each within the timeout."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                if self._lease is not None:
                    await bounded(self._lease.revoke(), self._timeout)
            with contextlib.suppress(Exception):
                await bounded(self._client.close(), self._timeout)
        self._client = self._lease = self._keepalive = None


async def bounded(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Await `coro` for at most `timeout` seconds, then raise TimeoutError. Unlike
    `asyncio.wait_for`, it never waits for the cancelled call to wind down: a gRPC call that
    ignores cancellation (seen with aetcd's lease calls) cannot hang the caller."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.add_done_callback(_consume)  # it may still end with an error nobody awaits
        task.cancel()
        raise TimeoutError(f"no answer within {timeout:.3g} s")
    return task.result()


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
