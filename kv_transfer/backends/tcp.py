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
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kv_transfer.backends.base import Backend, BackendContext
from kv_transfer.backends.two_sided import check_ranges, no_payload, serve_batch
from kv_transfer.batch import Batch
from kv_transfer.datatypes import SegmentDescriptor, TransferOp
from kv_transfer.errors import RemoteRejectedError, TransferError
from kv_transfer.messages import XferHeader, XferReply, recv_exact, recv_message, send_message
from kv_transfer.segment import LocalSegment
from kv_transfer.socket_io import recv_ranges, send_ranges, tensor_memoryview

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
        self._idle: dict[str, list[socket.socket]] = {}  # peer address → idle data connections
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
            sock = self._checkout(address, batch.remaining())
        except TransferError as e:
            batch.fail(e)
            return
        try:
            self._exchange(sock, batch)
        except TransferError as e:
            sock.close()
            batch.fail(e)
            return
        except OSError as e:
            sock.close()
            batch.fail(TransferError(f"TCP transfer to {batch.remote.owner} failed: {e}"))
            return
        self._checkin(address, sock)
        batch.complete()

    def _exchange(self, sock: socket.socket, batch: Batch) -> None:
        r = batch.ranges
        sock.settimeout(max(batch.remaining(), 0.001))
        header = XferHeader(batch_id=batch.batch_id, op=batch.op.value, segment=batch.remote.name,
                            num_ranges=len(r), total_bytes=r.total_bytes, tag=batch.notify.tag,
                            message=batch.notify.message, timeout_s=max(batch.remaining(), _TARGET_MIN_TIMEOUT_S))
        pairs = np.stack([r.remote_offsets, r.lengths], axis=1).astype("<i8")
        send_message(sock, header)
        sock.sendall(pairs.tobytes())
        self._expect(sock, "accept", batch)
        local = tensor_memoryview(batch.local.data)
        if batch.op is TransferOp.WRITE:
            send_ranges(sock, local, r.local_offsets, r.lengths)
            self._expect(sock, "done", batch)
        else:
            recv_ranges(sock, local, r.local_offsets, r.lengths)
            send_message(sock, XferReply(status="done"))

    @staticmethod
    def _expect(sock: socket.socket, status: str, batch: Batch) -> None:
        reply = recv_message(sock)
        if not isinstance(reply, XferReply):
            raise TransferError(f"peer {batch.remote.owner} answered with {type(reply).__name__}")
        if reply.status == "reject":
            raise RemoteRejectedError(f"peer {batch.remote.owner} refused the batch: {reply.error}")
        if reply.status != status:
            raise TransferError(f"peer {batch.remote.owner} answered {reply.status!r}, expected {status!r}")

    def _checkout(self, address: str, timeout_s: float) -> socket.socket:
        with self._lock:
            idle = self._idle.get(address)
            if idle:
                return idle.pop()
        return self.ctx.link.open(address, PURPOSE, timeout_s)

    def _checkin(self, address: str, sock: socket.socket) -> None:
        sock.settimeout(None)
        with self._lock:
            self._idle.setdefault(address, []).append(sock)

    # -- target ---------------------------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        """Serve one data connection until it closes."""
        while True:
            try:
                sock.settimeout(None)
                header = recv_message(sock)
            except (TransferError, ValueError, OSError):
                return
            if not isinstance(header, XferHeader) or not 0 <= header.num_ranges <= _MAX_RANGES:
                return
            try:
                pairs = np.frombuffer(recv_exact(sock, 16 * header.num_ranges), dtype="<i8").reshape(-1, 2)
            except TransferError:
                return
            if not self._serve_batch(sock, peer, header, pairs):
                return

    def _serve_batch(self, sock: socket.socket, peer: str, header: XferHeader, pairs: np.ndarray) -> bool:
        """One batch; returns False when the connection must be dropped."""
        segment = self.ctx.local_segment(header.segment)
        problem = check_ranges(segment, header, pairs)
        if problem is None and segment is not None and segment.device != "cpu":
            problem = f"segment {header.segment!r} is not in host memory"
        if problem is not None or segment is None:
            return serve_batch(sock, self.ctx.inbox, peer, header, pairs, problem, no_payload, no_payload, "TCP")
        view = tensor_memoryview(segment.data)
        return serve_batch(sock, self.ctx.inbox, peer, header, pairs, None,
                           lambda offsets, lengths: recv_ranges(sock, view, offsets, lengths),
                           lambda offsets, lengths: send_ranges(sock, view, offsets, lengths), "TCP")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for conns in self._idle.values():
                for sock in conns:
                    sock.close()
            self._idle.clear()

