"""Shared memory between two processes on one host: the initiator maps the peer's memfd-backed
segment and copies directly with torch (one-sided, like RDMA), then notifies the peer."""

from __future__ import annotations

import logging
import mmap
import queue
import threading

import torch

from engine.openmp import release_team
from kv_transfer.backends.base import Backend, BackendContext
from kv_transfer.batch import Batch
from kv_transfer.datatypes import SegmentDescriptor, TransferOp
from kv_transfer.errors import TransferError
from kv_transfer.segment import LocalSegment, map_peer_buffer
from kv_transfer.tensor_copy import copy_ranges

log = logging.getLogger(__name__)
INLINE_COPY_BYTES = 8 << 20  # batches up to this size are copied in the submitting thread


class SharedMemoryBackend(Backend):
    name = "shm"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        self._mapped: dict[tuple[str, str], tuple[mmap.mmap, torch.Tensor]] = {}  # (owner, segment) → mapping
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="kv-shm-copy", daemon=True)
        self._worker.start()

    def segment_endpoint(self, segment: LocalSegment) -> dict | None:
        return segment.shared.endpoint(segment.data) if segment.shared is not None else None

    def can_reach(self, local: LocalSegment, remote: SegmentDescriptor) -> bool:
        if local.device != "cpu" or remote.device != "cpu" or "shm" not in remote.endpoints:
            return False
        try:
            self.connect(remote)
        except (OSError, TransferError):
            return False
        return True

    def connect(self, remote: SegmentDescriptor) -> None:
        key = (remote.owner, remote.name)
        with self._lock:
            if key in self._mapped:
                return
        mapping = map_peer_buffer(dict(remote.endpoints["shm"]), remote.length)
        with self._lock:
            self._mapped.setdefault(key, mapping)

    def disconnect(self, remote: SegmentDescriptor) -> None:
        with self._lock:
            self._mapped.pop((remote.owner, remote.name), None)  # the mapping closes with its last view

    def start(self, batch: Batch) -> None:
        # A small copy costs less than waking the worker thread (tens of µs on a VM) and waiting
        # for the GIL: it runs here, as long as nothing queued before it is still pending.
        if batch.ranges.total_bytes <= INLINE_COPY_BYTES and self._queue.empty():
            self._move(batch)
        else:
            self._queue.put(batch)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            self._move(batch)
            if self._queue.empty():  # idle: its OpenMP team must not outlive the copies (engine.openmp)
                release_team()

    def _move(self, batch: Batch) -> None:
        if batch.remaining() <= 0 or batch.status.value != "pending":
            return
        with self._lock:
            mapped = self._mapped.get((batch.remote.owner, batch.remote.name))
        if mapped is None:
            error = TransferError(f"segment {batch.remote.name!r} is not mapped (open it first)")
            if batch.fail(error):
                self.notify_failure(batch, str(error))
            return
        remote = mapped[1]
        r = batch.ranges
        if batch.op is TransferOp.WRITE:
            copy_ranges(remote, r.remote_offsets, batch.local.data, r.local_offsets, r.lengths)
        else:
            copy_ranges(batch.local.data, r.local_offsets, remote, r.remote_offsets, r.lengths)
        self.finish_one_sided(batch)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)
        with self._lock:
            self._mapped.clear()
