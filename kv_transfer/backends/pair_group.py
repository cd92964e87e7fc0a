"""A two-rank torch.distributed process group between two engines, and the payload stream over it.

Built without `init_process_group` (global, one per process, while a pool needs one group per
pair of engines): rank 0 hosts a TCPStore, rank 1 joins it, and each constructs
`ProcessGroupNCCL` (CUDA) or `ProcessGroupGloo` (CPU) directly on a PrefixStore.

Payload: a batch's ranges back to back form one byte stream, cut every `chunk_bytes`. Both sides
cut the same lengths the same way, so their messages match one to one whatever the offsets. A
chunk inside one range moves straight from / into the segment; a chunk spanning several ranges
(small pages) is gathered into, or scattered from, one of WINDOW staging buffers. At most WINDOW
chunks are in flight; a staging buffer is reused only after the chunk that used it completed.

Failure leaves a group in an unknown state: its owner closes it, and the next batch builds anew.
- Gloo notices a peer whose sockets close (a dead process) and fails the wait; each wait carries
  the batch's remaining time. A Gloo timeout poisons the whole group.
- NCCL: a kernel whose peer died can spin forever without NCCL reporting anything (same-host P2P
  and SHM transports). So the owner polls the work, the deadline, a cancel flag and the data
  connection (EOF: the peer is gone), and on any failure aborts the communicator (`abort()`,
  i.e. ncclCommAbort: the kernels exit) before dropping the group. The group's own watchdog
  timeout is set far beyond any batch deadline so it never fires first. Asynchronous NCCL errors
  are still seen by ProcessGroupNCCL's watchdog, which acts per TORCH_NCCL_ASYNC_ERROR_HANDLING as
  read when a group is built: PyTorch's default (3) takes the whole process down; a serving process
  should export 2 (abort the failed communicator only). This module never sets it: setenv in one
  thread races getenv in others.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from common.settings import nccl_async_error_handling
from kv_transfer.errors import PeerLostError, TransferError, TransferTimeoutError
from kv_transfer.tensor_copy import copy_ranges

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
WINDOW = 4  # chunks in flight per transfer; also the number of staging buffers
_TAG = 0  # one transfer at a time per group: order alone matches messages
_POLL_S = 0.002
_NCCL_WATCHDOG_TIMEOUT = timedelta(hours=24)  # batches carry their own deadlines
_MIN_STORE_TIMEOUT_S = 5.0


class _Work(Protocol):
    def wait(self, timeout: timedelta = ...) -> bool: ...

    def is_completed(self) -> bool: ...


class _PointToPoint(Protocol):
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work: ...

    def abort(self) -> None: ...


def gloo_available() -> bool:
    return dist.is_available() and dist.is_gloo_available()


def nccl_available() -> bool:
    return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()


def host_store(host: str, timeout_s: float) -> c10d.TCPStore:
    """Rank 0's side of the rendezvous: a TCPStore server on a free port of `host`."""
    timeout = timedelta(seconds=max(timeout_s, _MIN_STORE_TIMEOUT_S))
    return c10d.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)


def join_store(host: str, port: int, timeout_s: float) -> c10d.TCPStore:
    """Rank 1's side: a client of the TCPStore that rank 0 announced."""
    return c10d.TCPStore(host, port, None, False, timedelta(seconds=max(timeout_s, _MIN_STORE_TIMEOUT_S)))


@dataclass(frozen=True)
class ChunkPlan:
    """One side's pieces of the stream, chunk after chunk: chunk k is pieces bounds[k]:bounds[k + 1]
    (offset in this side's buffer, length)."""

    offsets: np.ndarray
    lengths: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def chunk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
        return self.offsets[lo:hi], self.lengths[lo:hi]


def plan_chunks(offsets: np.ndarray, lengths: np.ndarray, chunk_bytes: int) -> ChunkPlan:
    """Cut the stream of ranges (offsets[i], lengths[i]), every length > 0, every `chunk_bytes`."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ChunkPlan(empty, empty, np.zeros(1, dtype=np.int64))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    chunk_starts = np.arange(0, total, chunk_bytes, dtype=np.int64)
    merged = np.sort(np.concatenate((starts, chunk_starts)))
    cuts = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]  # where pieces begin (np.unique
    # would do, but its first call costs 10+ ms of lazy imports in numpy 2.4)
    owner = np.searchsorted(starts, cuts, side="right") - 1
    pieces = offsets[owner] + (cuts - starts[owner])
    bounds = np.append(np.searchsorted(cuts, chunk_starts), len(cuts))
    return ChunkPlan(pieces, np.diff(np.append(cuts, total)), bounds)


class PairGroup:
    """One side of a two-rank group on `device`. One owner thread moves payloads, one transfer at a
    time (both sides must post their operations in the same order); `cancel` and `close` may come
    from any thread."""

    def __init__(self, backend: _PointToPoint, store: c10d.Store, rank: int, device: torch.device,
                 chunk_bytes: int) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes
        self._backend: _PointToPoint | None = backend
        self._store: c10d.Store | None = store  # rank 0's server must outlive the group (NCCL meets lazily)
        self._peer = 1 - rank
        self._staging: list[torch.Tensor | None] = [None] * WINDOW
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._cancelled = threading.Event()
        self._close_lock = threading.Lock()

    @classmethod
    def build(cls, store: c10d.Store, rank: int, device: torch.device, host: str, prefix: str, timeout_s: float,
              chunk_bytes: int) -> PairGroup:
        """Construct this side. Gloo connects to the peer here, so both sides build concurrently.
        Raises RuntimeError (torch's) when the rendezvous fails."""
        prefixed = c10d.PrefixStore(prefix, store)
        if device.type == "cuda":
            backend = _nccl_group(prefixed, rank, prefix)
        else:
            backend = _gloo_group(prefixed, rank, host, timeout_s)
        return cls(cast(_PointToPoint, backend), store, rank, device, chunk_bytes)

    @property
    def is_nccl(self) -> bool:
        return self.device.type == "cuda"

    # -- payload --------------------------------------------------------------------------------------
    def send(self, data: torch.Tensor, offsets: np.ndarray, lengths: np.ndarray, deadline: float,
             watch: socket.socket | None = None) -> None:
        """Send data[offsets[i]:+lengths[i]] for every i, in order, by `deadline` (time.monotonic).
        `watch`: a connection to the peer whose EOF means it is gone (checked while NCCL works)."""
        plan = plan_chunks(offsets, lengths, self.chunk_bytes)
        peer = _PeerWatch(watch)
        with self._failures(deadline), self._on_device():
            inflight: deque[_Work] = deque()
            for k in range(len(plan)):
                if len(inflight) == WINDOW:
                    self._wait(inflight.popleft(), deadline, peer)
                inflight.append(self._p2p().send([self._outgoing(data, plan, k)], self._peer, _TAG))
            while inflight:
                self._wait(inflight.popleft(), deadline, peer)

    def recv(self, data: torch.Tensor, offsets: np.ndarray, lengths: np.ndarray, deadline: float,
             watch: socket.socket | None = None) -> None:
        """Receive into data[offsets[i]:+lengths[i]] for every i; the bytes are in place on return."""
        plan = plan_chunks(offsets, lengths, self.chunk_bytes)
        peer = _PeerWatch(watch)
        with self._failures(deadline), self._on_device():
            inflight: deque[tuple[int, _Work, torch.Tensor]] = deque()
            for k in range(len(plan)):
                if len(inflight) == WINDOW:
                    self._land(data, plan, *inflight.popleft(), deadline, peer)
                buffer = self._incoming(data, plan, k)
                inflight.append((k, self._p2p().recv([buffer], self._peer, _TAG), buffer))
            while inflight:
                self._land(data, plan, *inflight.popleft(), deadline, peer)
            if self._stream is not None:
                self._stream.synchronize()

    def _outgoing(self, data: torch.Tensor, plan: ChunkPlan, k: int) -> torch.Tensor:
        offsets, lengths = plan.chunk(k)
        if len(offsets) == 1:
            return data[int(offsets[0]):int(offsets[0] + lengths[0])]
        staging = self._staging_buffer(k % WINDOW)[:int(lengths.sum())]
        _copy_pieces(staging, _packed_offsets(lengths), data, offsets, lengths)
        return staging

    def _incoming(self, data: torch.Tensor, plan: ChunkPlan, k: int) -> torch.Tensor:
        offsets, lengths = plan.chunk(k)
        if len(offsets) == 1:
            return data[int(offsets[0]):int(offsets[0] + lengths[0])]
        return self._staging_buffer(k % WINDOW)[:int(lengths.sum())]

    def _land(self, data: torch.Tensor, plan: ChunkPlan, k: int, work: _Work, buffer: torch.Tensor, deadline: float,
              peer: _PeerWatch) -> None:
        self._wait(work, deadline, peer)
        offsets, lengths = plan.chunk(k)
        if len(offsets) > 1:
            _copy_pieces(data, offsets, buffer, _packed_offsets(lengths), lengths)

    def _staging_buffer(self, slot: int) -> torch.Tensor:
        buffer = self._staging[slot]
        if buffer is None:
            buffer = self._staging[slot] = torch.empty(self.chunk_bytes, dtype=torch.uint8, device=self.device)
        return buffer

    # -- waiting --------------------------------------------------------------------------------------
    def _wait(self, work: _Work, deadline: float, peer: _PeerWatch) -> None:
        if not self.is_nccl:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError("the Gloo transfer missed its deadline")
            work.wait(timedelta(seconds=left))
            return
        while not work.is_completed():
            if self._cancelled.is_set():
                raise TransferError("the NCCL transfer was cancelled (its engine is closing)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError("the NCCL transfer missed its deadline")
            if peer.closed(min(left, _POLL_S)):
                raise PeerLostError("the peer closed its data connection mid-transfer")
        work.wait()  # raises the work's NCCL error, if any; orders our stream after the transfer

    @contextlib.contextmanager
    def _failures(self, deadline: float) -> Iterator[None]:
        """Turn torch's errors into typed ones."""
        try:
            yield
        except RuntimeError as e:  # DistBackendError and friends
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            if time.monotonic() >= deadline or "timed out" in text.lower():
                raise TransferTimeoutError(f"pair group transfer timed out: {text}") from e
            if any(word in text.lower() for word in ("closed", "reset", "connection", "broken pipe")):
                raise PeerLostError(f"pair group peer went away: {text}") from e
            raise TransferError(f"pair group transfer failed: {text}") from e

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            yield

    def _p2p(self) -> _PointToPoint:
        backend = self._backend
        if backend is None:
            raise TransferError("the pair group is closed")
        return backend

    # -- lifecycle ------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Make a running NCCL transfer fail at its next poll (a Gloo wait ends at its deadline)."""
        self._cancelled.set()

    def close(self) -> None:
        """Drop the group and its store (NCCL: abort the communicator first). Idempotent. Their C++
        destructors run here unless a transfer still holds the group: call this from a thread that
        is not a daemon, or before the interpreter exits (a daemon thread inside torch's C++ at exit
        aborts the process)."""
        self._cancelled.set()
        with self._close_lock:
            backend, self._backend = self._backend, None
            self._store = None
        if backend is not None and self.is_nccl:
            try:
                backend.abort()
            except RuntimeError as e:
                log.info("aborting a NCCL pair group failed: %s", e)
        self._staging = [None] * WINDOW
        del backend


class _PeerWatch:
    """EOF on the peer's data connection while a payload is in flight means the peer is gone. Once a
    frame is waiting (the peer's reply may overtake our last completion) the watch stops. A TLS
    connection is peeked beneath TLS, on its descriptor: the peek takes nothing from the stream,
    and a waiting TLS record is a frame too (kv_transfer.link_tls: no unasked records)."""

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    def closed(self, wait_s: float) -> bool:
        """Whether the peer closed the connection; waits up to `wait_s` to find out."""
        if self._sock is None:
            time.sleep(wait_s)
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], wait_s)
            if not readable:
                return False
            if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                pending = b"\x00"  # a decrypted frame is already buffered
            else:
                pending = socket.socket.recv(self._sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # ValueError: the socket was closed under us
            return True
        if not pending:
            return True
        self._sock = None
        return False


def _packed_offsets(lengths: np.ndarray) -> np.ndarray:
    return np.cumsum(lengths) - lengths


def _copy_pieces(dst: torch.Tensor, dst_offsets: np.ndarray, src: torch.Tensor, src_offsets: np.ndarray,
                 lengths: np.ndarray) -> None:
    if not dst.is_cuda:
        copy_ranges(dst, dst_offsets, src, src_offsets, lengths)
        return
    spans = zip(dst_offsets.tolist(), src_offsets.tolist(), lengths.tolist(), strict=True)
    dsts, srcs = zip(*((dst[d:d + n], src[s:s + n]) for d, s, n in spans), strict=True)
    torch._foreach_copy_(list(dsts), list(srcs))  # a few kernel launches, not one per piece


def _gloo_group(store: c10d.Store, rank: int, host: str, timeout_s: float) -> c10d.Backend:
    options = c10d.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._devices = [c10d.ProcessGroupGloo.create_device(hostname=host)]  # the peer link's interface
    options._timeout = timedelta(seconds=timeout_s)
    return c10d.ProcessGroupGloo(store, rank, 2, options)


def _nccl_group(store: c10d.Store, rank: int, name: str) -> c10d.Backend:
    _warn_about_error_handling()
    options = c10d.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = _NCCL_WATCHDOG_TIMEOUT
    options.global_ranks_in_group = [0, 1]
    options.group_name = name  # type: ignore[assignment]
    return c10d.ProcessGroupNCCL(store, rank, 2, options)


@functools.cache
def _warn_about_error_handling() -> None:
    if nccl_async_error_handling() not in ("0", "2"):
        log.warning("TORCH_NCCL_ASYNC_ERROR_HANDLING is not 2: an asynchronous NCCL error on a KV transfer "
                    "(e.g. a peer lost mid-transfer) may make PyTorch's watchdog end this process")
