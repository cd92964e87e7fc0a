"""TCP, pure Python, works anywhere. Scatter/gather I/O (`sendmsg` / `recvmsg_into`) moves bytes
straight between the socket and the segments' pages: no staging copy of the payload.

Per batch, on a data connection of the peer link:
  initiator → XferHeader + (offset, length) int64 pairs; target → accept | reject
  WRITE: initiator → payload; target → done      READ: target → payload; initiator → done
The target delivers the batch's notification locally once its side is complete, or a failed
one when the connection breaks mid-payload. A connection whose protocol state is unknown (a
timeout or error mid-batch) is closed, never reused.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kv_transfer.backends.base import Backend, BackendContext
from kv_transfer.backends.two_sided import check_batch, expect_reply, no_payload, serve_batch
from kv_transfer.batch import Batch
from kv_transfer.channel import Channel
from kv_transfer.datatypes import SegmentDescriptor, TransferOp
from kv_transfer.errors import RemoteRejectedError, TransferError
from kv_transfer.messages import XferHeader, XferReply
from kv_transfer.segment import LocalSegment
from kv_transfer.socket_io import tensor_memoryview

log = logging.getLogger(__name__)
_MAX_RANGES = 1 << 22
PURPOSE = "data:tcp"  # the Hello purpose of this backend's data connections
_TARGET_MIN_TIMEOUT_S = 1.0


class TcpBackend(Backend):
    name = "tcp"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        ctx.link.set_data_handler(self._serve, PURPOSE)
        self._pool = ThreadPoolExecutor(ctx.config.tcp_parallel_batches, thread_name_prefix="kv-tcp")
        self._idle: dict[str, list[Channel]] = {}  # peer address → idle data connections
        self._lock = threading.Lock()

    def can_reach(self, local: LocalSegment, remote: SegmentDescriptor) -> bool:
        return local.device == "cpu" and remote.device == "cpu"

    def start(self, batch: Batch) -> None:
        self._pool.submit(self._run, batch)

    # -- initiator ------------------------------------------------------------------------------------
    def _run(self, batch: Batch) -> None:
        if batch.status.value != "pending":
            return
        address = batch.remote.control
        try:
            channel = self._checkout(address, batch.remaining())
        except TransferError as e:
            batch.fail(e)
            return
        try:
            self._exchange(channel, batch)
        except RemoteRejectedError as e:  # refused at its header: both sides are still in step
            self._checkin(address, channel)
            batch.fail(e)
            return
        except TransferError as e:
            channel.close()
            batch.fail(e)
            return
        except (OSError, ValueError) as e:  # ValueError: a malformed reply
            channel.close()
            batch.fail(TransferError(f"TCP transfer to {batch.remote.owner} failed: {e}"))
            return
        self._checkin(address, channel)
        batch.complete()

    def _exchange(self, channel: Channel, batch: Batch) -> None:
        r = batch.ranges
        channel.settimeout(max(batch.remaining(), 0.001))
        header = XferHeader(batch_id=batch.batch_id, op=batch.op.value, segment=batch.remote.name,
                            num_ranges=len(r), total_bytes=r.total_bytes, tag=batch.notify.tag,
                            message=batch.notify.message, timeout_s=max(batch.remaining(), _TARGET_MIN_TIMEOUT_S))
        pairs = np.stack([r.remote_offsets, r.lengths], axis=1).astype("<i8")
        channel.send(header)
        channel.send_bytes(pairs.tobytes())
        expect_reply(channel, "accept", batch.remote.owner)
        local = tensor_memoryview(batch.local.data)
        if batch.op is TransferOp.WRITE:
            channel.send_ranges(local, r.local_offsets, r.lengths)
            expect_reply(channel, "done", batch.remote.owner)
        else:
            channel.recv_ranges(local, r.local_offsets, r.lengths)
            channel.send(XferReply(status="done"))

    def _checkout(self, address: str, timeout_s: float) -> Channel:
        with self._lock:
            idle = self._idle.get(address)
            if idle:
                return idle.pop()
        return self.ctx.link.open(address, PURPOSE, timeout_s)

    def _checkin(self, address: str, channel: Channel) -> None:
        channel.settimeout(None)
        with self._lock:
            self._idle.setdefault(address, []).append(channel)

    # -- target ---------------------------------------------------------------------------------------
    def _serve(self, channel: Channel, peer: str) -> None:
        """Serve one data connection until it closes."""
        while True:
            try:
                channel.settimeout(None)
                header = channel.recv()
                if not isinstance(header, XferHeader) or not 0 <= header.num_ranges <= _MAX_RANGES:
                    return
                pairs = np.frombuffer(channel.recv_bytes(16 * header.num_ranges), dtype="<i8").reshape(-1, 2)
            except (TransferError, ValueError, OSError):
                return
            if not self._serve_batch(channel, peer, header, pairs):
                return

    def _serve_batch(self, channel: Channel, peer: str, header: XferHeader, pairs: np.ndarray) -> bool:
        """One batch; returns False when the connection must be dropped."""
        segment = self.ctx.local_segment(header.segment)
        problem, code = check_batch(segment, header, pairs, peer, self.ctx.grants)
        if problem is None and segment is not None and segment.device != "cpu":
            problem = f"segment {header.segment!r} is not in host memory"
        if problem is not None or segment is None:
            return serve_batch(channel, self.ctx.inbox, peer, header, pairs, (problem, code), no_payload, no_payload,
                               "TCP")
        view = tensor_memoryview(segment.data)
        return serve_batch(channel, self.ctx.inbox, peer, header, pairs, (None, ""),
                           lambda offsets, lengths: channel.recv_ranges(view, offsets, lengths),
                           lambda offsets, lengths: channel.send_ranges(view, offsets, lengths), "TCP")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for conns in self._idle.values():
                for channel in conns:
                    channel.close()
            self._idle.clear()

