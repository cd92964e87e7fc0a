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
from typing import Literal

from kv_transfer.etcd_access import EtcdAccess
from kv_transfer.etcd_lease import LeasedKeys, bounded, etcd_client

log = logging.getLogger(__name__)

_RELIST_MIN_S, _RELIST_MAX_S = 0.2, 1.0  # spacing of the directory's listings while etcd is unreachable

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
    max_model_len: int = 0  # 0: unknown
    transfer: dict[str, str] = field(default_factory=dict)  # e.g. {"engine_id": ..., "segment": ...}
    tls: bool = False  # its Worker service takes only mutual-TLS calls (cluster.tls)

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


class WorkerRegistration:
    """Keeps one worker's record in etcd for as long as the worker runs."""

    def __init__(self, endpoint: str, cluster: str, record: WorkerRecord, ttl_s: int = 3,
                 timeout_s: float = 2.0, access: EtcdAccess | None = None) -> None:
        self.record = record
        self.key = worker_key(cluster, record)
        self._keys = LeasedKeys(endpoint, ttl_s, timeout_s, access)

    async def start(self) -> None:
        """Register (raises if etcd is unreachable); the lease is then kept alive in the background,
        and the record written again whenever the lease was lost."""
        await self._keys.put(self.key, self.record.to_json())

    @property
    def registrations(self) -> int:
        """How many leases the record was written under (1 + recoveries)."""
        return self._keys.grants

    @property
    def lease_id(self) -> int | None:
        return self._keys.lease_id

    async def stop(self) -> None:
        """Revoke the lease (the key vanishes now) and close the client."""
        await self._keys.close()


class WorkerDirectory:
    """The router's live view of the workers of one cluster."""

    def __init__(self, endpoint: str, cluster: str, timeout_s: float = 2.0,
                 on_change: Callable[[], None] | None = None, access: EtcdAccess | None = None) -> None:
        self.endpoint, self.cluster, self.access = endpoint, cluster, access
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
        """List, then watch from the listed revision; after any failure list again on a fresh client.

        Invariant: the view changes only through a complete listing or a watch event, never through
        a failure. While etcd is unreachable the router keeps routing on its last view (a worker that
        died meanwhile costs a retry elsewhere, not an outage) and re-lists as soon as etcd answers:
        attempts are spaced 0.2 s, doubling up to 1 s, so a long outage is no request storm."""
        retry_s, failures = _RELIST_MIN_S, 0
        while True:
            client = etcd_client(self.endpoint, self._timeout, self.access)
            try:
                listed = await bounded(client.get_prefix(self._prefix.encode()), self._timeout)
                self._replace({kv.key.decode(): kv.value for kv in listed})
                self.relists += 1
                if failures:
                    log.warning("etcd at %s is back after %d failed listings: %d workers", self.endpoint, failures,
                                len(self._workers))
                retry_s, failures = _RELIST_MIN_S, 0
                watch = await bounded(client.watch_prefix(self._prefix.encode(),
                                                          start_revision=listed.header.revision + 1), self._timeout)
                async for event in watch:
                    self._apply(event.kind, event.kv.key.decode(), event.kv.value)
                raise ConnectionError("the watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd restarted or unreachable: list again from scratch
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "worker watch on %s failed (%s): keeping the last view of %d workers, listing again",
                        self.endpoint, e, len(self._workers))
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, _RELIST_MAX_S)
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
