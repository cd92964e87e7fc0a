"""Keys kept in etcd under one lease, for as long as their owner runs (segment descriptors, worker
records), and the deadline helper every etcd call goes through.

Invariant: after `put(key)` and until `delete(key)` or `close()`, the key is in etcd whenever etcd
is reachable (within one keep-alive round, TTL/3, of etcd coming back). A refresh that fails or
finds the lease gone (etcd restarted or unreachable, or the owner paused longer than the TTL)
grants a new lease and writes every key again. `close()` revokes the lease, so the keys vanish at
once; a killed owner's keys vanish when the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from common.etcd.access import EtcdAccess

log = logging.getLogger(__name__)
T = TypeVar("T")


async def bounded(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Await `coro` for at most `timeout` seconds, then raise TimeoutError. Unlike
    `asyncio.wait_for`, it never waits for the cancelled call to wind down: a gRPC call that
    ignores cancellation (seen with aetcd's lease calls) cannot hang the caller.

    Invariant: CancelledError leaves here only when the caller itself is cancelled. A call whose
    channel was closed under it (a lease recovery replacing the client while a get is in flight)
    ends in grpc.aio with CancelledError; that becomes ConnectionError, an ordinary failure, for a
    stray CancelledError escapes every `except Exception` above and can leave a gRPC handler that
    awaited the call without ever answering."""
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
    if task.cancelled():
        raise ConnectionError("the call was cancelled under us (its client was closed)")
    return task.result()


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


# Each client gets its own connection (not gRPC's process-wide subchannel pool) with reconnect
# backoff capped at 1 s: after an etcd outage, a fresh client must connect as soon as etcd is back,
# not fail fast for the seconds of backoff the pooled connection piled up (workers would miss their
# lease TTL and drop out of the routers' view).
_CHANNEL_OPTIONS = {"grpc.use_local_subchannel_pool": 1, "grpc.initial_reconnect_backoff_ms": 200,
                    "grpc.min_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000}


def etcd_client(endpoint: str, timeout_s: float, access: EtcdAccess | None = None) -> Any:
    """An aetcd client (connects on first use), over `access` (plaintext, no auth by default)."""
    from common.etcd.client import EtcdClient

    host, port = parse_endpoint(endpoint)
    return EtcdClient(host, port, access or EtcdAccess(), timeout=timeout_s,
                      connect_wait_timeout=max(int(timeout_s), 1), options=dict(_CHANNEL_OPTIONS))


class LeasedKeys:
    def __init__(self, endpoint: str, ttl_s: int, timeout_s: float, access: EtcdAccess | None = None) -> None:
        parse_endpoint(endpoint)
        if ttl_s < 2:
            raise ValueError("etcd's minimum lease TTL is 2 s")
        self.endpoint, self.access = endpoint, access
        self._ttl, self._timeout = ttl_s, timeout_s
        self._keys: dict[str, bytes] = {}
        self._client: Any = None
        self._lease: Any = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # guards the client
        self._write_lock = asyncio.Lock()  # puts and recoveries: each key under the current lease
        self.grants = 0  # leases granted: 1 + the number of recoveries

    async def client(self) -> Any:
        async with self._lock:
            if self._client is None:
                self._client = etcd_client(self.endpoint, self._timeout, self.access)
            return self._client

    async def put(self, key: str, value: bytes) -> None:
        async with self._write_lock:  # never under a lease a concurrent recovery is replacing
            client = await self.client()
            if self._lease is None:
                await self._grant(client)
            await bounded(client.put(key.encode(), value, lease=self._lease), self._timeout)
            self._keys[key] = value

    async def delete(self, key: str) -> None:
        async with self._write_lock:  # a concurrent recovery must not write the key back
            self._keys.pop(key, None)
            client = await self.client()
            await bounded(client.delete(key.encode()), self._timeout)

    async def _grant(self, client: Any) -> None:
        self._lease = await bounded(client.lease(self._ttl), self._timeout)
        self.grants += 1
        if self._task is None:
            self._task = asyncio.create_task(self._keep_alive(), name=f"etcd-lease-{self.endpoint}")

    async def _keep_alive(self) -> None:
        """One round every TTL/3: refresh the lease; if that fails (etcd away or restarted, the lease
        expired), reconnect, grant a new lease and write every key again. At most one grant per
        round, however long etcd stays away (no re-registration storm); nothing but cancellation
        ends the loop. An outage is logged once when it starts and once when it ends."""
        failed_rounds = 0
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                if self._lease is not None:
                    reply = await bounded(self._lease.refresh(), self._timeout)
                    if reply is not None and reply.TTL > 0:
                        continue
                    log.warning("the lease at %s expired: writing %d keys again", self.endpoint, len(self._keys))
            except Exception as e:
                if failed_rounds == 0:
                    log.warning("refreshing the lease at %s failed (%s): reconnecting", self.endpoint, e)
            try:
                await self._recover()
            except Exception as e:  # etcd still away: try again next round
                failed_rounds += 1
                log.log(logging.WARNING if failed_rounds == 1 else logging.DEBUG,
                        "re-registering at %s failed (%s): retrying every %.1f s", self.endpoint, e, self._ttl / 3)
                continue
            if failed_rounds:
                log.warning("etcd at %s is back: %d keys written again after %d failed rounds",
                            self.endpoint, len(self._keys), failed_rounds)
            failed_rounds = 0

    async def _recover(self) -> None:
        async with self._write_lock:
            self._lease = None  # until the new grant: the next round goes straight to recovery
            old, self._client = self._client, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await bounded(old.close(), self._timeout)
            client = await self.client()
            await self._grant(client)
            for key, value in list(self._keys.items()):
                await bounded(client.put(key.encode(), value, lease=self._lease), self._timeout)

    @property
    def lease_id(self) -> int | None:
        return None if self._lease is None else int(self._lease.id)

    async def close(self) -> None:
        """Revoke the lease (every key vanishes now) and close the client, each within the timeout."""
        if self._task is not None:
            self._task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                if self._lease is not None:
                    await bounded(self._lease.revoke(), self._timeout)
            with contextlib.suppress(Exception):
                await bounded(self._client.close(), self._timeout)
        self._client = self._lease = self._task = None
        self._keys.clear()
