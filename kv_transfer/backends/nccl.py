"""NCCL, CUDA to CUDA: torch.distributed point-to-point send/recv over one two-rank process group
per pair of engines and devices (kv_transfer/backends/pair_group.py). CPU segments take the same
code path over Gloo, but only when the engine's config names "nccl" explicitly: Gloo is slower than
shm or TCP and serves to run this protocol where there is no GPU.

Per (peer, local device, remote device) the initiator keeps a channel: one worker thread, one
"data:nccl" connection of the peer link, one pair group built on the channel's first batch:
  initiator → GroupSetup (its TCPStore's address); target → accept | reject;
  both build the group (initiator rank 0, target rank 1); target → done
then per batch, as the TCP backend but with the payload in the group:
  initiator → XferHeader + (offset, length) int64 pairs; target → accept | reject
  WRITE: initiator sends, target receives; target → done
  READ: target sends, initiator receives; initiator → done
A channel runs one batch at a time, so both sides post their sends and receives in the same order
(NCCL matches point-to-point operations by order alone). The target delivers the batch's
notification once its side is complete, or a failed one when the batch breaks off. Any failure
but a refused header closes the connection and the group on both sides; the channel's next batch
builds a new pair. Losing the peer engine drops its channels.

CUDA segments: submit only once the bytes are ready (as with the one-sided backends): transfers
run on a stream of their own. Two segments on the same GPU are not reachable through NCCL (it
cannot put both ranks of a communicator on one device). The first batch of a CUDA channel also
creates the NCCL communicator. Deadlines, dead peers and NCCL aborts: see pair_group.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
import uuid

import numpy as np
import torch

from kv_transfer.backends.base import Backend, BackendContext
from kv_transfer.backends.pair_group import (
    CHUNK_BYTES,
    PairGroup,
    gloo_available,
    host_store,
    join_store,
    nccl_available,
)
from kv_transfer.backends.two_sided import check_batch, expect_reply, no_payload, serve_batch
from kv_transfer.batch import Batch
from kv_transfer.channel import Channel
from kv_transfer.datatypes import BatchStatus, SegmentDescriptor, TransferOp
from kv_transfer.errors import PeerLostError, RemoteRejectedError, TransferError
from kv_transfer.messages import GroupSetup, XferHeader, XferReply
from kv_transfer.peer_link import parse_address
from kv_transfer.segment import LocalSegment

log = logging.getLogger(__name__)
PURPOSE = "data:nccl"
_MAX_RANGES = 1 << 22
_MAX_CHUNK_BYTES = 1 << 30
_TARGET_MIN_TIMEOUT_S = 1.0
_MIN_SETUP_TIMEOUT_S = 5.0
_CLOSE_JOIN_S = 2.0

# (peer engine, its peer-link address, local device, remote device), devices as "cpu" / "cuda:N". The
# address keeps batches for a peer that restarted under the same engine id off the old channel.
ChannelKey = tuple[str, str, str, str]


class NcclBackend(Backend):
    name = "nccl"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._host = parse_address(ctx.link.address)[0]
        self._gloo_allowed = "nccl" in ctx.config.backends  # CPU pairs only when asked for by name
        self._lock = threading.Lock()
        self._channels: dict[ChannelKey, _GroupLink] = {}
        self._serving: set[PairGroup] = set()  # target side, one per incoming channel
        self._closed = False
        ctx.link.set_data_handler(self._serve, PURPOSE)

    @classmethod
    def is_available(cls) -> bool:
        return gloo_available() or nccl_available()

    def segment_endpoint(self, segment: LocalSegment) -> dict | None:
        if segment.device == "cuda":
            return {"device": "cuda", "uuid": gpu_uuid(segment.data.device)} if nccl_available() else None
        return {"device": "cpu"} if gloo_available() else None

    def can_reach(self, local: LocalSegment, remote: SegmentDescriptor) -> bool:
        endpoint = remote.endpoints.get("nccl")
        if endpoint is None or endpoint.get("device") != local.device or remote.device != local.device:
            return False
        if local.device == "cuda":
            return nccl_available() and endpoint.get("uuid") != gpu_uuid(local.data.device)
        return self._gloo_allowed and gloo_available()

    def start(self, batch: Batch) -> None:
        remote = batch.remote
        key = (remote.owner, remote.control, device_name(batch.local.data.device), remote_device_name(remote))
        with self._lock:
            channel = None if self._closed else self._channels.get(key)
            if channel is None and not self._closed:
                channel = self._channels[key] = _GroupLink(self.ctx, self._host, remote.control,
                                                         batch.local.data.device, key[3])
        if channel is None:
            batch.fail(TransferError("the NCCL backend is closed"))
            return
        channel.submit(batch)

    def notify_failure(self, batch: Batch, error: str) -> None:
        """Nothing to send: as with TCP, the target learns of a failed batch from its own connection
        (and delivers the failed notification itself), so a second one would only duplicate it."""

    def disconnect(self, remote: SegmentDescriptor) -> None:
        if self.ctx.link.is_connected(remote.owner):
            return  # only one segment changed: the owner's channels stay
        with self._lock:
            doomed = [c for key, c in self._channels.items() if key[0] == remote.owner]
            self._channels = {key: c for key, c in self._channels.items() if key[0] != remote.owner}
        for channel in doomed:
            channel.close()

    def close(self) -> None:
        """Close every pair group from this (the closing) thread, before the interpreter may exit."""
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
            serving, self._serving = list(self._serving), set()
        for channel in channels:
            channel.close()
        for group in serving:
            group.close()

    # -- target ---------------------------------------------------------------------------------------
    def _serve(self, channel: Channel, peer: str) -> None:
        """Serve one incoming channel until its connection closes; the pair group goes with it."""
        group: PairGroup | None = None
        try:
            while True:
                try:
                    channel.settimeout(None)
                    msg = channel.recv()
                    if isinstance(msg, XferHeader) and 0 <= msg.num_ranges <= _MAX_RANGES:
                        pairs = np.frombuffer(channel.recv_bytes(16 * msg.num_ranges), dtype="<i8").reshape(-1, 2)
                except (TransferError, ValueError, OSError):
                    return
                if isinstance(msg, GroupSetup):
                    if group is not None:
                        self._drop(group)
                    group = self._join(channel, msg)
                    if group is None:
                        return
                elif isinstance(msg, XferHeader) and 0 <= msg.num_ranges <= _MAX_RANGES:
                    if not self._serve_batch(channel, peer, msg, pairs, group):
                        return
                else:
                    return
        finally:
            if group is not None:
                self._drop(group)

    def _join(self, channel: Channel, setup: GroupSetup) -> PairGroup | None:
        """Build our side of the group the initiator set up; None when the connection must close."""
        device, problem = _check_setup(setup)
        try:
            if device is None:
                channel.send(XferReply(status="reject", error=problem))
                return None
            channel.send(XferReply(status="accept"))
            store = join_store(setup.store_host, setup.store_port, setup.timeout_s)
            group = PairGroup.build(store, 1, device, self._host, setup.prefix, setup.timeout_s, setup.chunk_bytes)
        except (OSError, RuntimeError) as e:  # RuntimeError: torch's rendezvous errors
            log.info("could not join the pair group %s: %s", setup.prefix, e)
            return None
        with self._lock:
            closed = self._closed
            if not closed:
                self._serving.add(group)
        if closed:
            group.close()
            return None
        try:
            channel.send(XferReply(status="done"))
        except OSError:
            self._drop(group)
            return None
        return group

    def _serve_batch(self, channel: Channel, peer: str, header: XferHeader, pairs: np.ndarray,
                     group: PairGroup | None) -> bool:
        """One batch; returns False when the connection (and its group) must be dropped."""
        segment = self.ctx.local_segment(header.segment)
        problem, code = check_batch(segment, header, pairs, peer, self.ctx.grants)
        if group is None:
            problem, code = "no pair group was set up on this connection", ""
        elif problem is None and segment is not None and segment.data.device != group.device:
            problem = f"segment {header.segment!r} is on {segment.data.device}, this pair group on {group.device}"
        if problem is not None or segment is None or group is None:
            return serve_batch(channel, self.ctx.inbox, peer, header, pairs, (problem, code), no_payload, no_payload,
                               "NCCL")
        deadline = time.monotonic() + header.timeout_s
        data, sock = segment.data, channel.sock
        return serve_batch(
            channel, self.ctx.inbox, peer, header, pairs, (None, ""),
            lambda offsets, lengths: group.recv(data, offsets, lengths, deadline, watch=sock),
            lambda offsets, lengths: group.send(data, offsets, lengths, deadline, watch=sock), "NCCL")

    def _drop(self, group: PairGroup) -> None:
        with self._lock:
            self._serving.discard(group)
        group.close()


class _GroupLink:
    """Initiator side towards one (peer, local device, remote device): batches in submission order on
    one worker thread, over one data connection and one pair group, built on first use and rebuilt
    after a failure."""

    def __init__(self, ctx: BackendContext, host: str, address: str, local_device: torch.device,
                 remote_device: str) -> None:
        self._ctx = ctx
        self._host = host
        self._address = address
        self._local_device = local_device
        self._remote_device = remote_device
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._link: Channel | None = None  # set and cleared by the worker; close() may shut it down
        self._group: PairGroup | None = None  # built over _link; None until the setup completed
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=f"kv-nccl-{address}", daemon=True)
        self._worker.start()

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def close(self) -> None:
        """Stop: queued batches fail at once, a running one soon (NCCL) or at its deadline (Gloo).
        Waits a little for the worker to drop the group (see PairGroup.close)."""
        with self._lock:
            self._closed = True
            link, group = self._link, self._group
        self._queue.put(None)
        if group is not None:
            group.cancel()
        if link is not None:
            link.shutdown()
        if threading.current_thread() is not self._worker:
            self._worker.join(_CLOSE_JOIN_S)

    def _loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._closed:
                batch.fail(PeerLostError(f"the NCCL channel to {batch.remote.owner} was closed"))
            elif batch.status is BatchStatus.PENDING:
                self._run(batch)
        self._reset()
        with contextlib.suppress(queue.Empty):
            while True:
                late = self._queue.get_nowait()
                if late is not None:
                    late.fail(PeerLostError(f"the NCCL channel to {late.remote.owner} was closed"))

    def _run(self, batch: Batch) -> None:
        owner = batch.remote.owner
        try:
            self._ensure_group(batch)
            self._exchange(batch)
        except RemoteRejectedError as e:  # the header was refused: connection and group stay in step
            batch.fail(e)
            return
        except TransferError as e:
            self._reset()
            batch.fail(e)
            return
        except OSError as e:
            self._reset()
            batch.fail(PeerLostError(f"NCCL transfer to {owner} failed: {e}"))
            return
        except Exception as e:  # a bug must not kill the worker: later batches would hang to their deadline
            log.exception("NCCL channel to %s failed unexpectedly", owner)
            self._reset()
            batch.fail(TransferError(f"NCCL transfer to {owner} failed unexpectedly: {e!r}"))
            return
        batch.complete()

    def _ensure_group(self, batch: Batch) -> None:
        if self._group is not None:
            return
        owner = batch.remote.owner
        timeout = max(batch.remaining(), _MIN_SETUP_TIMEOUT_S)  # a group outlives the batch that builds it
        link = self._ctx.link.open(self._address, PURPOSE, timeout)
        with self._lock:
            self._link = link
            closed = self._closed
        if closed:
            raise PeerLostError(f"the NCCL channel to {owner} was closed")
        link.settimeout(timeout)
        try:
            store = host_store(self._host, timeout)
            prefix = f"tandem-kv/{uuid.uuid4().hex}/"
            link.send(GroupSetup(store_host=self._host, store_port=store.port, prefix=prefix,
                                 device=self._remote_device, chunk_bytes=CHUNK_BYTES, timeout_s=timeout))
            expect_reply(link, "accept", owner)
            group = PairGroup.build(store, 0, self._local_device, self._host, prefix, timeout, CHUNK_BYTES)
        except RemoteRejectedError:  # the target closes the connection after refusing a group
            self._reset()
            raise
        except RuntimeError as e:  # torch's store / rendezvous errors
            raise TransferError(f"building the pair group with {owner} failed: {e}") from e
        with self._lock:
            self._group = group
        expect_reply(link, "done", owner)

    def _exchange(self, batch: Batch) -> None:
        link, group = self._link, self._group
        assert link is not None and group is not None
        sock = link.sock
        r = batch.ranges
        link.settimeout(max(batch.remaining(), 0.001))
        header = XferHeader(batch_id=batch.batch_id, op=batch.op.value, segment=batch.remote.name,
                            num_ranges=len(r), total_bytes=r.total_bytes, tag=batch.notify.tag,
                            message=batch.notify.message, timeout_s=max(batch.remaining(), _TARGET_MIN_TIMEOUT_S))
        pairs = np.stack([r.remote_offsets, r.lengths], axis=1).astype("<i8")
        link.send(header)
        link.send_bytes(pairs.tobytes())
        expect_reply(link, "accept", batch.remote.owner)
        if batch.op is TransferOp.WRITE:
            group.send(batch.local.data, r.local_offsets, r.lengths, batch.deadline, watch=sock)
            expect_reply(link, "done", batch.remote.owner)
        else:
            group.recv(batch.local.data, r.local_offsets, r.lengths, batch.deadline, watch=sock)
            link.send(XferReply(status="done"))

    def _reset(self) -> None:
        with self._lock:
            link, group = self._link, self._group
            self._link = self._group = None
        if group is not None:
            group.close()
        if link is not None:
            link.close()


def _check_setup(setup: GroupSetup) -> tuple[torch.device | None, str]:
    """The device the initiator wants us on, or None and why not."""
    if not (0 < setup.chunk_bytes <= _MAX_CHUNK_BYTES and setup.timeout_s > 0 and 0 < setup.store_port < 65536):
        return None, "malformed group setup"
    try:
        device = torch.device(setup.device)
    except (RuntimeError, TypeError):
        return None, f"unknown device {setup.device!r}"
    if device.type == "cpu" and gloo_available():
        return device, ""
    if device.type == "cuda" and nccl_available() and device.index is not None \
            and 0 <= device.index < torch.cuda.device_count():
        return device, ""
    return None, f"no process group backend here for {setup.device}"


def device_name(device: torch.device) -> str:
    return f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"


def remote_device_name(remote: SegmentDescriptor) -> str:
    return f"cuda:{remote.device_id}" if remote.device == "cuda" else "cpu"


def gpu_uuid(device: torch.device) -> str:
    return _gpu_uuid(device.index or 0)


@functools.cache
def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)
