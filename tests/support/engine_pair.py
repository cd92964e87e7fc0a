"""Two transfer engines in one process (unit tests of a backend), and the page checks they share."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kv_transfer import (
    BatchStatus,
    InvalidTransferError,
    NotifySpec,
    Ranges,
    TransferEngine,
    TransferOp,
    TransferRequest,
)

PAGE = 4096
PAGES = 64


@dataclass
class Pair:
    a: TransferEngine  # initiator
    b: TransferEngine  # target
    src: torch.Tensor  # a's segment "a"
    dst: torch.Tensor  # b's segment "b"


def random_pages(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct local pages and `count` distinct remote pages, in random order."""
    rng = np.random.default_rng(seed)
    return rng.choice(PAGES, count, replace=False), rng.choice(PAGES, count, replace=False)


def page_ranges(local_pages: np.ndarray, remote_pages: np.ndarray) -> Ranges:
    return Ranges(local_pages * PAGE, remote_pages * PAGE, np.full(len(local_pages), PAGE))


def assert_pages(dst: torch.Tensor, before: torch.Tensor, src: torch.Tensor, dst_pages: np.ndarray,
                 src_pages: np.ndarray) -> None:
    """`dst` holds `src`'s pages at `dst_pages` and is otherwise unchanged from `before`."""
    expected = before.cpu().clone().view(PAGES, PAGE)
    expected[torch.from_numpy(dst_pages)] = src.cpu().view(PAGES, PAGE)[torch.from_numpy(src_pages)]
    assert torch.equal(dst.cpu().view(PAGES, PAGE), expected)


def check_write_then_read(p: Pair, backend: str) -> None:
    """Scattered pages WRITE a → b, then READ b → a: every byte checked, notifications delivered."""
    local_pages, remote_pages = random_pages(1, 12)
    before = p.dst.clone()
    with p.b.subscribe("w1", peer=p.a.engine_id) as sub:
        handle = p.a.submit_ranges(TransferOp.WRITE, "a", "b", page_ranges(local_pages, remote_pages),
                                   notify=NotifySpec("w1", b"\x00write\xff"))
        handle.wait(10)
        assert handle.status is BatchStatus.DONE and handle.backends == [backend]
        note = sub.get(5)
    assert (note.peer, note.tag, note.message, note.ok) == (p.a.engine_id, "w1", b"\x00write\xff", True)
    assert note.batch_id == handle.batch_ids[0]
    assert_pages(p.dst, before, p.src, remote_pages, local_pages)
    handle.release()

    local_pages, remote_pages = random_pages(2, 9)
    before = p.src.clone()
    with p.b.subscribe("r1") as sub:
        requests = [TransferRequest(TransferOp.READ, int(lp) * PAGE, "b", int(rp) * PAGE, PAGE)
                    for lp, rp in zip(local_pages, remote_pages, strict=True)]
        with p.a.submit("a", requests, notify=NotifySpec("r1", b"read")) as handle:
            handle.wait(10)
        note = sub.get(5)
    assert (note.peer, note.message, note.ok) == (p.a.engine_id, b"read", True)
    assert_pages(p.src, before, p.dst, local_pages, remote_pages)


def check_out_of_range_refused(p: Pair) -> None:
    """A batch with one range past the end of the remote segment is refused whole: nothing moves."""
    before = p.dst.clone()
    requests = [TransferRequest(TransferOp.WRITE, 0, "b", 0, PAGE),
                TransferRequest(TransferOp.WRITE, 0, "b", PAGES * PAGE - 10, 100)]
    with pytest.raises(InvalidTransferError):
        p.a.submit("a", requests)
    time.sleep(0.05)
    assert torch.equal(p.dst, before)
