"""Where segment descriptors are published: etcd in a cluster, an in-process store in unit tests.

Keys are `<prefix>/segments/<name>`. The etcd store keeps them under one lease
(common.etcd.lease.LeasedKeys): a killed process's descriptors vanish after the TTL,
`close()` makes them vanish at once, and they are written again after etcd loses the lease.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from common.etcd.access import EtcdAccess
from common.etcd.lease import LeasedKeys, bounded
from kv_transfer.errors import MetadataStoreError

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
    the endpoint and the key. Published keys live under one kept-alive lease (see LeasedKeys)."""

    def __init__(self, endpoint: str, lease_ttl_s: int = 10, timeout_s: float = 5.0,
                 access: EtcdAccess | None = None) -> None:
        self.endpoint = endpoint
        self._timeout = timeout_s
        self.keys = LeasedKeys(endpoint, lease_ttl_s, timeout_s, access)

    async def _call(self, coro: Coroutine[Any, Any, T], what: str, key: str) -> T:
        try:
            return await bounded(coro, self._timeout)
        except Exception as e:
            raise MetadataStoreError(
                f"etcd at {self.endpoint} is unreachable or failed ({what} {key!r}): {type(e).__name__}: {e}") from e

    async def put(self, key: str, value: bytes) -> None:
        await self._call(self.keys.put(key, value), "put", key)

    async def get(self, key: str) -> bytes | None:
        client = await self.keys.client()
        result = await self._call(client.get(key.encode()), "get", key)
        return None if result is None else bytes(result.value)

    async def delete(self, key: str) -> None:
        await self._call(self.keys.delete(key), "delete", key)

    async def close(self) -> None:
        """Revoke the lease (the descriptors vanish now) and close the client."""
        await self.keys.close()
