"""The router's view of the workers, from etcd (records: common.worker_record).

The router lists the prefix, watches from the listed revision, and lists again after any stream
error, so it never misses or keeps a stale worker for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from common.etcd.access import EtcdAccess
from common.etcd.lease import bounded, etcd_client
from common.worker_record import WorkerRecord, WorkerRole, workers_prefix

log = logging.getLogger(__name__)

_RELIST_MIN_S, _RELIST_MAX_S = 0.2, 1.0  # spacing of the directory's listings while etcd is unreachable


class WorkerDirectory:
    """The router's live view of the workers of one cluster."""

    def __init__(self, endpoint: str, cluster: str, timeout_s: float = 2.0,
                 on_change: Callable[[], None] | None = None, access: EtcdAccess | None = None) -> None:
        self.endpoint, self.cluster, self.access = endpoint, cluster, access
        self._prefix = workers_prefix(cluster)
        self._timeout = timeout_s
        self._on_change = on_change
        self._workers: dict[str, WorkerRecord] = {}  # by etcd key
        self._changed_keys: set[str] | None = None  # since take_changes(); None: all (a listing replaced the view)
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.relists = 0

    def workers(self, role: WorkerRole | None = None) -> list[WorkerRecord]:
        return sorted((w for w in self._workers.values() if role is None or w.role == role),
                      key=lambda w: w.worker_id)

    def records(self) -> dict[str, WorkerRecord]:
        """Every record by its etcd key (a copy)."""
        return dict(self._workers)

    def record_at(self, key: str) -> WorkerRecord | None:
        return self._workers.get(key)

    def take_changes(self) -> set[str] | None:
        """The keys put or deleted since the last call; None when a listing replaced the whole view
        (the first, or one after a watch failure): then every record may have changed."""
        changed, self._changed_keys = self._changed_keys, set()
        return changed

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
        self._changed_keys = None
        self._notify()

    def _apply(self, kind: str, key: str, raw: bytes) -> None:
        if kind == "PUT":
            self._store(key, raw)
        else:
            self._workers.pop(key, None)
        if self._changed_keys is not None:
            self._changed_keys.add(key)
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
