"""The transfer engine: named segments, published descriptors, batches of READ/WRITE requests.

Threads: `submit` only validates and hands the batch to a backend; backends complete batches from
their own threads; a watchdog fails any batch past its deadline (so a transport that cannot see
a dead peer never hangs a caller). Segment registration and lookup are async: they talk to the
metadata store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kv_transfer import metrics
from kv_transfer.backends import Backend, BackendContext, backend_class
from kv_transfer.batch import NO_NOTIFY, Batch, BatchHandle, NotifySpec
from kv_transfer.config import TransferEngineConfig
from kv_transfer.datatypes import (
    BackendName,
    BatchStatus,
    Notification,
    Ranges,
    SegmentDescriptor,
    TransferOp,
    TransferRequest,
)
from kv_transfer.errors import (
    BackendUnavailableError,
    InvalidTransferError,
    MetadataStoreError,
    PeerLostError,
    SegmentNotFoundError,
)
from kv_transfer.grants import GrantKey, GrantTable
from kv_transfer.messages import Notify
from kv_transfer.metadata import MetadataStore, segment_key
from kv_transfer.notifications import NotificationInbox, Subscription
from kv_transfer.peer_link import PeerLink
from kv_transfer.segment import LocalSegment, SharedHostBuffer, flat_bytes

log = logging.getLogger(__name__)
_WATCHDOG_PERIOD_S = 0.02
_LONGEST_SLEEP_S = 3600.0  # under threading.TIMEOUT_MAX: an infinite deadline must not kill the watchdog


@dataclass(frozen=True)
class RemoteSegment:
    descriptor: SegmentDescriptor
    backends: tuple[BackendName, ...]  # those that connected to it, in preference order

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def owner(self) -> str:
        return self.descriptor.owner


class TransferEngine:
    def __init__(self, store: MetadataStore, config: TransferEngineConfig | None = None) -> None:
        self.config = config or TransferEngineConfig()
        self.engine_id = self.config.engine_id or f"xfer-{uuid.uuid4().hex[:12]}"
        self.store = store
        self.inbox = NotificationInbox()
        self.link = PeerLink(self.engine_id, self.config.host, self.config.port, self._on_notify, self._on_peer_lost,
                             self.config.link_secret, self.config.seal_payloads, self.config.link_tls)
        self._lock = threading.Lock()
        self._segments: dict[str, LocalSegment] = {}
        self._shared: list[SharedHostBuffer] = []
        self._remotes: dict[str, RemoteSegment] = {}
        self._lost: dict[str, str] = {}  # remote segment → why its owner was lost (until re-opened)
        self._routes: dict[tuple[str, str], Backend] = {}  # (local, remote segment) → backend
        self._pending: set[Batch] = set()
        self.grants = GrantTable()
        ctx = BackendContext(self.engine_id, self.config, self.link, self.inbox, self._local_segment, self.grants)
        self.backends: dict[BackendName, Backend] = {}
        for name in self.config.preferred_backends:
            cls = backend_class(name)
            if cls is not None and cls.is_available():
                self.backends[name] = cls(ctx)
            elif self.config.backends:
                raise BackendUnavailableError(f"backend {name!r} was asked for but cannot run here")
        self._closed = threading.Event()
        self._pending_changed = threading.Condition(self._lock)  # an earlier deadline, or the engine closed
        self._watchdog_until = -math.inf  # the deadline the sleeping watchdog wakes at; -inf: awake
        self._watchdog = threading.Thread(target=self._expire_loop, name="kv-xfer-watchdog", daemon=True)
        self._watchdog.start()

    # -- local segments -------------------------------------------------------------------------------
    def allocate_host_buffer(self, nbytes: int, label: str = "segment") -> torch.Tensor:
        """Host memory that same-host peers can map (the shared-memory backend needs it)."""
        buffer = SharedHostBuffer(nbytes, label)
        with self._lock:
            self._shared.append(buffer)
        return buffer.tensor

    async def register_segment(self, name: str, tensor: torch.Tensor, *, guarded: bool = False) -> SegmentDescriptor:
        """Register `tensor` (contiguous, CPU or CUDA) as segment `name` and publish its descriptor.
        `guarded`: peers move bytes of it over two-sided transports only inside grants (`grant`)."""
        if not name or "/" in name:
            raise InvalidTransferError(f"segment name {name!r} must be non-empty and contain no '/'")
        data = flat_bytes(tensor)
        with self._lock:
            if name in self._segments:
                raise InvalidTransferError(f"segment {name!r} is already registered")
            shared = next((b for b in self._shared if not data.is_cuda and b.contains(data)), None)
            segment = LocalSegment(name, data, shared, guarded)
            self._segments[name] = segment
        endpoints: dict[str, dict] = {}
        for backend in self.backends.values():
            endpoint = backend.segment_endpoint(segment)
            if endpoint is not None:
                endpoints[backend.name] = endpoint
        descriptor = SegmentDescriptor(name=name, owner=self.engine_id, length=segment.length, device=segment.device,
                                       device_id=segment.device_id, address=segment.address,
                                       control=self.link.address, endpoints=endpoints)
        try:
            await self.store.put(segment_key(self.config.metadata_prefix, name), descriptor.to_json())
        except MetadataStoreError:
            self._forget(name)
            raise
        return descriptor

    async def unregister_segment(self, name: str) -> None:
        if self._local_segment(name) is None:
            raise InvalidTransferError(f"segment {name!r} is not registered")
        await self.store.delete(segment_key(self.config.metadata_prefix, name))
        self._forget(name)

    def grant(self, segment: str, peer: str, tag: str, offsets: np.ndarray, lengths: np.ndarray,
              ops: tuple[str, ...] = ("write",)) -> list[GrantKey]:
        """Let engine `peer` move these byte ranges of guarded local `segment` in batches tagged
        `tag` (for `ops`); returns the keys to `revoke` with."""
        if self._local_segment(segment) is None:
            raise InvalidTransferError(f"segment {segment!r} is not registered")
        return self.grants.grant(segment, peer, tag, offsets, lengths, ops)

    def revoke(self, keys: list[GrantKey]) -> None:
        """End grants: later batches under them are refused (one already accepted still lands)."""
        self.grants.revoke(keys)

    def _forget(self, name: str) -> None:
        with self._lock:
            segment = self._segments.pop(name, None)
        if segment is not None:
            for backend in self.backends.values():
                backend.forget_segment(segment)

    def _local_segment(self, name: str) -> LocalSegment | None:
        with self._lock:
            return self._segments.get(name)

    # -- remote segments ------------------------------------------------------------------------------
    async def open_segment(self, name: str) -> RemoteSegment:
        """Look `name` up in the metadata store and connect to its owner. Idempotent."""
        with self._lock:
            known = self._remotes.get(name)
        if known is not None and self.link.is_connected(known.owner):
            return known
        raw = await self.store.get(segment_key(self.config.metadata_prefix, name))
        if raw is None:
            raise SegmentNotFoundError(name)
        descriptor = SegmentDescriptor.from_json(raw)
        remote = await asyncio.to_thread(self._connect, descriptor)
        with self._lock:
            self._remotes[name] = remote
            self._lost.pop(name, None)
            self._routes = {k: v for k, v in self._routes.items() if k[1] != name}
        return remote

    def _connect(self, descriptor: SegmentDescriptor) -> RemoteSegment:
        self.link.connect(descriptor.owner, descriptor.control)
        connected: list[BackendName] = []
        for backend in self.backends.values():
            if backend.name != "tcp" and backend.name not in descriptor.endpoints:
                continue
            try:
                backend.connect(descriptor)
            except Exception as e:  # a backend that cannot reach this peer just does not serve it
                log.info("backend %s cannot reach segment %s of %s: %s", backend.name, descriptor.name,
                         descriptor.owner, e)
                continue
            connected.append(backend.name)
        if not connected:
            raise BackendUnavailableError(
                f"no backend here can reach segment {descriptor.name!r} of {descriptor.owner}")
        return RemoteSegment(descriptor, tuple(connected))

    def _route(self, local: LocalSegment, remote: RemoteSegment, backend: BackendName | None) -> Backend:
        key = (local.name, remote.name)
        if backend is None:
            with self._lock:
                chosen = self._routes.get(key)
            if chosen is not None:
                return chosen
        names = [backend] if backend is not None else list(remote.backends)
        for name in names:
            candidate = self.backends.get(name)
            if candidate is not None and name in remote.backends and candidate.can_reach(local, remote.descriptor):
                if backend is None:
                    with self._lock:
                        self._routes[key] = candidate
                return candidate
        raise BackendUnavailableError(
            f"no backend {'named ' + backend if backend else 'here'} moves bytes between local segment "
            f"{local.name!r} ({local.device}) and {remote.name!r} ({remote.descriptor.device}); "
            f"connected: {list(remote.backends)}")

    # -- batches --------------------------------------------------------------------------------------
    def submit(self, local_segment: str, requests: Sequence[TransferRequest], *, notify: NotifySpec = NO_NOTIFY,
               timeout_s: float | None = None, backend: BackendName | None = None) -> BatchHandle:
        """Submit requests (any mix of ops and opened remote segments): one sub-batch per (remote
        segment, op), each notifying its segment's owner. Raises InvalidTransferError before any
        byte moves if a range falls outside its segment."""
        groups: dict[tuple[str, TransferOp], list[TransferRequest]] = {}
        for req in requests:
            groups.setdefault((req.remote_segment, req.op), []).append(req)
        plans = []
        for (remote, op), reqs in groups.items():
            ranges = Ranges(np.array([r.local_offset for r in reqs]), np.array([r.remote_offset for r in reqs]),
                            np.array([r.length for r in reqs]))
            plans.append(self._plan(op, local_segment, remote, ranges, notify, timeout_s, backend))
        return self._start(plans)

    def submit_ranges(self, op: TransferOp, local_segment: str, remote_segment: str, ranges: Ranges, *,
                      notify: NotifySpec = NO_NOTIFY, timeout_s: float | None = None,
                      backend: BackendName | None = None) -> BatchHandle:
        """The array form of `submit` for one remote segment and one op (no per-request objects)."""
        return self._start([self._plan(op, local_segment, remote_segment, ranges, notify, timeout_s, backend)])

    def _plan(self, op: TransferOp, local_name: str, remote_name: str, ranges: Ranges, notify: NotifySpec,
              timeout_s: float | None, backend: BackendName | None) -> tuple[Backend, Batch]:
        local = self._local_segment(local_name)
        if local is None:
            raise InvalidTransferError(f"local segment {local_name!r} is not registered")
        with self._lock:
            remote = self._remotes.get(remote_name)
        if remote is None:
            lost = self._lost.get(remote_name)
            if lost is not None:
                raise PeerLostError(f"the owner of segment {remote_name!r} went away ({lost}); open it again")
            raise InvalidTransferError(f"remote segment {remote_name!r} is not open (call open_segment first)")
        ranges.check_within(local.length, remote.descriptor.length, remote_name)
        chosen = self._route(local, remote, backend)
        timeout = self.config.default_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise InvalidTransferError(f"timeout must be positive, got {timeout}")
        return chosen, Batch(op, local, remote.descriptor, ranges, notify, chosen.name, timeout)

    def _start(self, plans: list[tuple[Backend, Batch]]) -> BatchHandle:
        for backend, batch in plans:
            with self._lock:
                self._pending.add(batch)
                if batch.deadline < self._watchdog_until:  # most batches fall due after one already pending
                    self._pending_changed.notify()
            batch.add_done_callback(self._on_batch_done)
            if len(batch.ranges) == 0:
                backend.finish_one_sided(batch)
            elif not self.link.is_connected(batch.remote.owner):
                batch.fail(PeerLostError(f"peer {batch.remote.owner} is not connected (re-open its segment)"))
            else:
                backend.start(batch)
        return BatchHandle([batch for _, batch in plans])

    def _on_batch_done(self, batch: Batch) -> None:
        with self._lock:
            self._pending.discard(batch)
        metrics.record(batch)

    def _expire_loop(self) -> None:
        """Fails each pending batch at its deadline. It sleeps until the earliest deadline, a new batch or
        the close: an idle engine's watchdog never wakes (a fleet of simulated workers has many)."""
        while True:
            with self._pending_changed:
                if self._closed.is_set():
                    return
                now = time.monotonic()
                overdue = [b for b in self._pending if b.deadline <= now]
                if not overdue:
                    self._watchdog_until = min((b.deadline for b in self._pending), default=math.inf)
                    self._pending_changed.wait(min(self._watchdog_until - now, _LONGEST_SLEEP_S))
                    self._watchdog_until = -math.inf
                    continue
            for batch in overdue:  # failing one runs its done callbacks, which take the lock
                if batch.expire_if_overdue(now) and batch.backend != "tcp":
                    self.backends[batch.backend].notify_failure(batch, str(batch.error))  # type: ignore[index]
            with self._lock:
                stuck = any(b in self._pending for b in overdue)
            if stuck:  # failed, yet not yet discarded by its callback: no busy loop meanwhile
                self._closed.wait(_WATCHDOG_PERIOD_S)

    # -- notifications --------------------------------------------------------------------------------
    def subscribe(self, tag: str, peer: str | None = None) -> Subscription:
        """Notifications for batches that named `tag` (buffered if they arrived earlier). With
        `peer`, losing the link to that engine fails the waits at once."""
        return self.inbox.subscribe(tag, peer)

    def _on_notify(self, peer: str, msg: Notify) -> None:
        self.inbox.deliver(Notification(peer=peer, batch_id=msg.batch_id, tag=msg.tag, message=msg.message,
                                        ok=msg.ok, error=msg.error))

    def _on_peer_lost(self, peer: str, reason: str) -> None:
        log.info("peer %s lost: %s", peer, reason)
        self.inbox.peer_lost(peer, reason)
        with self._lock:
            doomed = [b for b in self._pending if b.remote.owner == peer]
            gone = [r for r in self._remotes.values() if r.owner == peer]
            for remote in gone:
                del self._remotes[remote.name]
                self._lost[remote.name] = reason
            self._routes = {k: v for k, v in self._routes.items() if k[1] not in {r.name for r in gone}}
        for batch in doomed:
            if batch.status is BatchStatus.PENDING:
                batch.fail(PeerLostError(f"peer {peer} went away mid-transfer: {reason}"))
        for remote in gone:
            for backend in self.backends.values():
                backend.disconnect(remote.descriptor)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def close(self) -> None:
        """Unpublish every segment, stop backends and the peer link. Pending batches fail."""
        for name in list(self._segments):
            try:
                await self.store.delete(segment_key(self.config.metadata_prefix, name))
            except MetadataStoreError as e:
                log.warning("could not unpublish segment %s: %s", name, e)
        self.shutdown()

    def shutdown(self) -> None:
        """Synchronous part of `close` (no metadata-store calls)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            self._pending_changed.notify_all()
            pending = list(self._pending)
        for batch in pending:
            batch.fail(PeerLostError("the transfer engine was closed"))
        for backend in self.backends.values():
            backend.close()
        self.link.close()
        for name in list(self._segments):
            self._forget(name)
