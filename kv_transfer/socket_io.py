"""Scatter/gather socket I/O over byte ranges of one buffer, without intermediate copies."""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import torch

from kv_transfer.errors import PeerLostError, TransferTimeoutError

_IOV_MAX = 1024  # Linux's limit on buffers per sendmsg/recvmsg call


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
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i:i + _IOV_MAX])
        except TimeoutError as e:
            raise TransferTimeoutError("sending the payload timed out") from e
        except OSError as e:
            raise PeerLostError(f"peer dropped the connection while we sent: {e}") from e
        i = _consume(views, i, sent, on_piece)


def recv_ranges(sock: socket.socket, base: memoryview, offsets: np.ndarray, lengths: np.ndarray,
                on_piece: OnPiece | None = None) -> None:
    """Receive into the ranges in order; `on_piece` sees each piece once it has landed."""
    views = _views(base, offsets, lengths)
    i = 0
    while i < len(views):
        try:
            got = sock.recvmsg_into(views[i:i + _IOV_MAX])[0]
        except TimeoutError as e:
            raise TransferTimeoutError("receiving the payload timed out") from e
        except OSError as e:
            raise PeerLostError(f"peer dropped the connection while we received: {e}") from e
        if got == 0:
            raise PeerLostError("peer closed the connection mid-payload")
        i = _consume(views, i, got, on_piece)
