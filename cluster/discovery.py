"""Worker discovery through etcd.

Workers register `/tandem/<cluster>/workers/<role>/<id>` under a lease of a few seconds, keep it
alive, and register again after losing it (etcd restarted, or a pause longer than the TTL). A
clean stop revokes the lease, so the key vanishes at once; a killed worker's key vanishes when
its lease expires. The router lists the prefix, watches from the listed revision, and lists again
after any stream error, so it never misses or keeps a stale worker for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kv_transfer.metadata import bounded

log = logging.getLogger(__name__)

WorkerRole = Literal["prefill", "decode", "both"]
ROLES: tuple[WorkerRole, ...] = ("prefill", "decode", "both")


@dataclass(frozen=True)
class WorkerRecord:
    """What the router needs to know about a worker (the value of its etcd key)."""

    worker_id: str
    role: WorkerRole
    address: str  # gRPC host:port of its Worker service
    model: str
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    transfer: dict[str, str] = field(default_factory=dict)  # e.g. {"engine_id": ..., "segment": ...}

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not self.worker_id or "/" in self.worker_id:
            raise ValueError(f"worker id {self.worker_id!r} must be non-empty and contain no '/'")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerRecord:
        return cls(**json.loads(raw))


def workers_prefix(cluster: str) -> str:
    return f"/tandem/{cluster}/workers/"


def worker_key(cluster: str, record: WorkerRecord) -> str:
    return f"{workers_prefix(cluster)}{record.role}/{record.worker_id}"


def _client(endpoint: str, timeout_s: float) -> Any:
    import aetcd

    host, _, port = endpoint.rpartition(":")
    return aetcd.Client(host, int(port), timeout=timeout_s, connect_wait_timeout=max(int(timeout_s), 1))


class WorkerRegistration:
    """Keeps one worker's record in etcd for as long as the worker runs."""

    def __init__(self, endpoint: str, cluster: str, record: WorkerRecord, ttl_s: int = 3,
                 timeout_s: float = 2.0) -> None:
        if ttl_s < 2:
            raise ValueError("etcd's minimum lease TTL is 2 s")
        self.endpoint, self.cluster, self.record = endpoint, cluster, record
        self.key = worker_key(cluster, record)
        self._ttl, self._timeout = ttl_s, timeout_s
        self._client: Any = None
        self._lease: Any = None
        self._task: asyncio.Task | None = None
        self.registrations = 0  # how many times the key was (re)written

    async def start(self) -> None:
        """Register once (raises if etcd is unreachable), then keep the lease alive in the background."""
        await self._register()
        self._task = asyncio.create_task(self._keep_alive(), name=f"etcd-lease-{self.record.worker_id}")

    async def _register(self) -> None:
        if self._client is None:
            self._client = _client(self.endpoint, self._timeout)
        self._lease = await bounded(self._client.lease(self._ttl), self._timeout)
        await bounded(self._client.put(self.key.encode(), self.record.to_json(), lease=self._lease), self._timeout)
        self.registrations += 1

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                reply = await bounded(self._lease.refresh(), self._timeout)
                if reply is not None and reply.TTL > 0:
                    continue
                log.warning("lease of %s expired: registering again", self.key)
            except Exception as e:
                log.warning("keeping %s alive failed (%s): registering again", self.key, e)
            try:
                await self._reconnect_and_register()
            except Exception as e:  # etcd still away: try again next round
                log.warning("registering %s failed: %s", self.key, e)

    async def _reconnect_and_register(self) -> None:
        old, self._client = self._client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await bounded(old.close(), self._timeout)
        await self._register()

    async def stop(self) -> None:
        """Revoke the lease (the key vanishes now) and close the client."""
        if self._task is not None:
            self._task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await bounded(self._lease.revoke(), self._timeout)
            with contextlib.suppress(Exception):
                await bounded(self._client.close(), self._timeout)
        self._client = self._task = None


class WorkerDirectory:
    """The router's live view of the workers of one cluster."""

    def __init__(self, endpoint: str, cluster: str, timeout_s: float = 2.0,
                 on_change: Callable[[], None] | None = None) -> None:
        self.endpoint, self.cluster = endpoint, cluster
        self._prefix = workers_prefix(cluster)
        self._timeout = timeout_s
        self._on_change = on_change
        self._workers: dict[str, WorkerRecord] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.relists = 0

    def workers(self, role: WorkerRole | None = None) -> list[WorkerRecord]:
        return sorted((w for w in self._workers.values() if role is None or w.role == role),
                      key=lambda w: w.worker_id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"etcd-watch-{self.cluster}")

    async def wait_until(self, predicate: Callable[[WorkerDirectory], bool], timeout_s: float) -> None:
        """Until `predicate(self)` holds; raises TimeoutError after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self):
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"workers did not reach the expected state in {timeout_s} s: {self.workers()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def _run(self) -> None:
        while True:
            client = _client(self.endpoint, self._timeout)
            try:
                listed = await bounded(client.get_prefix(self._prefix.encode()), self._timeout)
                self._replace({kv.key.decode(): kv.value for kv in listed})
                self.relists += 1
                watch = await bounded(client.watch_prefix(self._prefix.encode(),
                                                          start_revision=listed.header.revision + 1), self._timeout)
                async for event in watch:
                    self._apply(event.kind, event.kv.key.decode(), event.kv.value)
                raise ConnectionError("the watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd restarted or unreachable: list again from scratch
                log.info("worker watch on %s failed (%s): listing again", self.endpoint, e)
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await bounded(client.close(), self._timeout)

    def _replace(self, values: dict[str, bytes]) -> None:
        self._workers = {}
        for key, raw in values.items():
            self._store(key, raw)
        self._notify()

    def _apply(self, kind: str, key: str, raw: bytes) -> None:
        if kind == "PUT":
            self._store(key, raw)
        else:
            self._workers.pop(key, None)
        self._notify()

    def _store(self, key: str, raw: bytes) -> None:
        try:
            self._workers[key] = WorkerRecord.from_json(raw)
        except (ValueError, TypeError) as e:
            log.warning("ignoring malformed worker record at %s: %s", key, e)

    def _notify(self) -> None:
        self._changed.set()
        if self._on_change is not None:
            self._on_change()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self._timeout)  # never hang on a stuck gRPC stream
