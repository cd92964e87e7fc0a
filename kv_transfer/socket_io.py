"""Scatter/gather socket I/O over byte ranges of one buffer: without intermediate copies on a plain
socket (sendmsg / recvmsg_into); a TLS socket has neither, so its sends gather small ranges into
TLS-record-sized writes and its receives land record by record in place (recv_into)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator

import numpy as np
import torch

from kv_transfer.errors import PeerLostError, TransferTimeoutError

_IOV_MAX = 1024  # Linux's limit on buffers per sendmsg/recvmsg call
_TLS_WRITE_BYTES = 256 << 10  # a TLS send gathers ranges up to this size per write (records are 16 KiB)


@contextlib.contextmanager
def _typed_errors(sending: bool) -> Iterator[None]:
    """A socket's timeout or failure as the transfer error it means."""
    try:
        yield
    except TimeoutError as e:
        raise TransferTimeoutError(f"{'sending' if sending else 'receiving'} timed out") from e
    except (OSError, ValueError) as e:  # ssl.SSLError; ValueError: a TLS socket closed under us
        raise PeerLostError(f"peer dropped the connection while we {'sent' if sending else 'received'}: {e}") from e


def shutdown(sock: socket.socket) -> None:
    """End both directions now (threads blocked on `sock` return). A TLS socket is shut down beneath
    TLS: its own shutdown() unwraps it first, so a racing send would go out in clear."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def tensor_memoryview(data: torch.Tensor) -> memoryview:
    """A writable byte memoryview over a flat CPU uint8 tensor's memory (no copy)."""
    return data.numpy().data.cast("B")


def _views(base: memoryview, offsets: np.ndarray, lengths: np.ndarray) -> list[memoryview]:
    return [base[o:o + k] for o, k in zip(offsets.tolist(), lengths.tolist(), strict=True)]


OnPiece = Callable[[memoryview], None]


def _consume(views: list[memoryview], i: int, n: int, on_piece: OnPiece | None) -> int:
    """Advance past `n` bytes that the kernel took (or gave) from `views[i:]`, splitting a
    partially moved view; `on_piece` sees every moved piece, in order. Returns the new `i`."""
    while n > 0:
        view = views[i]
        if n >= len(view):
            if on_piece is not None:
                on_piece(view)
            n -= len(view)
            i += 1
        else:
            if on_piece is not None:
                on_piece(view[:n])
            views[i] = view[n:]
            n = 0
    return i


def send_ranges(sock: socket.socket, base: memoryview, offsets: np.ndarray, lengths: np.ndarray,
                on_piece: OnPiece | None = None) -> None:
    """Send the ranges in order; `on_piece` sees each piece once it is sent (still hot in cache)."""
    views = _views(base, offsets, lengths)
    if isinstance(sock, ssl.SSLSocket):
        _send_views_tls(sock, views, on_piece)
        return
    i = 0
    while i < len(views):
        with _typed_errors(sending=True):
            sent = sock.sendmsg(views[i:i + _IOV_MAX])
        i = _consume(views, i, sent, on_piece)


def recv_ranges(sock: socket.socket, base: memoryview, offsets: np.ndarray, lengths: np.ndarray,
                on_piece: OnPiece | None = None) -> None:
    """Receive into the ranges in order; `on_piece` sees each piece once it has landed."""
    views = _views(base, offsets, lengths)
    if isinstance(sock, ssl.SSLSocket):
        _recv_views_tls(sock, views, on_piece)
        return
    i = 0
    while i < len(views):
        with _typed_errors(sending=False):
            got = sock.recvmsg_into(views[i:i + _IOV_MAX])[0]
        if got == 0:
            raise PeerLostError("peer closed the connection mid-payload")
        i = _consume(views, i, got, on_piece)


def _send_views_tls(sock: ssl.SSLSocket, views: list[memoryview], on_piece: OnPiece | None) -> None:
    """Large views go as they are; runs of small ones are gathered into one write (a copy is cheap
    beside the encryption, a write per small range is not)."""
    gathered = bytearray()
    with _typed_errors(sending=True):
        for view in views:  # `on_piece` sees a gathered view once copied (the bytes that will be sent)
            if len(view) >= _TLS_WRITE_BYTES:
                if gathered:
                    sock.sendall(gathered)
                    gathered.clear()
                sock.sendall(view)
            else:
                gathered += view
                if len(gathered) >= _TLS_WRITE_BYTES:
                    sock.sendall(gathered)
                    gathered.clear()
            if on_piece is not None:
                on_piece(view)
        if gathered:
            sock.sendall(gathered)


def fill(sock: socket.socket, view: memoryview) -> None:
    """Receive exactly len(view) bytes into `view` (a plain or a TLS socket)."""
    filled = 0
    while filled < len(view):
        with _typed_errors(sending=False):
            got = sock.recv_into(view[filled:])
        if got == 0:
            raise PeerLostError("peer closed the connection")
        filled += got


def _recv_views_tls(sock: ssl.SSLSocket, views: list[memoryview], on_piece: OnPiece | None) -> None:
    for view in views:
        fill(sock, view)
        if on_piece is not None:
            on_piece(view)
