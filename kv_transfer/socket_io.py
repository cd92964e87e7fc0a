"""Scatter/gather socket I/O over byte ranges of one buffer, without intermediate copies."""

from __future__ import annotations

import socket

import numpy as np
import torch

from kv_transfer.errors import PeerLostError, TransferTimeoutError

_IOV_MAX = 1024  # Linux's limit on buffers per sendmsg/recvmsg call


def tensor_memoryview(data: torch.Tensor) -> memoryview:
    """A writable byte memoryview over a flat CPU uint8 tensor's memory (no copy)."""
    return data.numpy().data.cast("B")


def _views(base: memoryview, offsets: np.ndarray, lengths: np.ndarray) -> list[memoryview]:
    return [base[o:o + k] for o, k in zip(offsets.tolist(), lengths.tolist(), strict=True)]


def send_ranges(sock: socket.socket, base: memoryview, offsets: np.ndarray, lengths: np.ndarray) -> None:
    views = _views(base, offsets, lengths)
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i:i + _IOV_MAX])
        except TimeoutError as e:
            raise TransferTimeoutError("sending the payload timed out") from e
        except OSError as e:
            raise PeerLostError(f"peer dropped the connection while we sent: {e}") from e
        while sent > 0:  # advance past what the kernel took, splitting a partially sent view
            if sent >= len(views[i]):
                sent -= len(views[i])
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def recv_ranges(sock: socket.socket, base: memoryview, offsets: np.ndarray, lengths: np.ndarray) -> None:
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
        while got > 0:
            if got >= len(views[i]):
                got -= len(views[i])
                i += 1
            else:
                views[i] = views[i][got:]
                got = 0
