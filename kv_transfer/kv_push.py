"""Prefill side: push each layer's freshly written pages to the decode engine's reserved blocks
while the next layer computes (an `engine.kv_hooks.KVStepHook`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from engine.outputs import RequestOutput
from engine.remote_kv import NOT_NEEDED
from engine.scheduler import SchedulerOutput
from kv_transfer.batch import BatchHandle, NotifySpec
from kv_transfer.datatypes import Ranges, TransferOp
from kv_transfer.errors import TransferError
from kv_transfer.kv_connector import KVConnector, KVPushNote, PeerKV, kv_tag

log = logging.getLogger(__name__)


@dataclass
class _Target:
    request_id: str
    peer: PeerKV
    remote_blocks: list[int]
    timeout_s: float
    next_block: int = 0  # blocks before this were pushed complete (the last partial one is re-pushed)
    error: str | None = None
    step_blocks: tuple[int, int, list[int], list[int]] | None = None  # (start, end, local ids, remote ids)
    handles: list[BatchHandle] = field(default_factory=list)


DEFAULT_MIN_BATCH_BYTES = 4 << 20


def should_flush(layer: int, num_layers: int, pending_bytes: int, min_batch_bytes: int) -> bool:
    """Layers are pushed in groups of at least `min_batch_bytes` (every batch costs a notification
    and a few hundred µs of overhead), and always at the last layer."""
    return layer == num_layers - 1 or pending_bytes >= min_batch_bytes


class KVPusher:
    """Attach with `engine.set_kv_hook(pusher)`; call `expect` before adding each request to push.

    As layers finish, their pages go out in groups of at least `min_batch_bytes` (0: one batch
    per layer): a WRITE per request per group, whose note names the layers and blocks it carries.
    """

    def __init__(self, connector: KVConnector, block_size: int,
                 min_batch_bytes: int = DEFAULT_MIN_BATCH_BYTES) -> None:
        self.connector = connector
        self.block_size = block_size
        self.min_batch_bytes = min_batch_bytes
        self._targets: dict[str, _Target] = {}
        self._active: list[_Target] = []
        self._pending_layers: list[int] = []
        self._step_layer_bytes = 0  # bytes of one layer's pages across the step's active targets
        self.bytes_submitted = 0  # every page's bytes handed to the transfer engine, ever
        self._lock = threading.Lock()

    def expect(self, request_id: str, peer: PeerKV, remote_blocks: list[int], timeout_s: float = 30.0) -> None:
        with self._lock:
            self._targets[request_id] = _Target(request_id, peer, list(remote_blocks), timeout_s)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._targets.pop(request_id, None)

    # -- KVStepHook -----------------------------------------------------------------------------------
    def begin_step(self, plan: SchedulerOutput) -> bool:
        self._active = []
        with self._lock:
            for item in plan.scheduled:
                target = self._targets.get(item.seq.request_id)
                if target is None or target.error is not None:
                    continue
                end_token = item.start + item.num_tokens - len(item.draft_token_ids)
                start = min(target.next_block, item.start // self.block_size)
                end = min(-(-end_token // self.block_size), len(target.remote_blocks))
                if end <= start:
                    continue
                # blocks the decode side does not need (behind every layer's window there) are not sent
                pairs = [(local, remote) for local, remote in zip(item.seq.block_table[start:end],
                                                                  target.remote_blocks[start:end], strict=True)
                         if remote != NOT_NEEDED]
                target.next_block = end_token // self.block_size
                if not pairs:
                    continue
                target.step_blocks = (start, end, [p[0] for p in pairs], [p[1] for p in pairs])
                self._active.append(target)
        self._pending_layers = []
        self._step_layer_bytes = sum(len(t.step_blocks[2]) for t in self._active
                                     if t.step_blocks is not None) * self.connector.layout.block_bytes
        return bool(self._active)

    def layer_written(self, layer: int) -> None:
        self._pending_layers.append(layer)
        pending_bytes = len(self._pending_layers) * self._step_layer_bytes
        if not should_flush(layer, self.connector.layout.num_layers, pending_bytes, self.min_batch_bytes):
            return
        layers, self._pending_layers = self._pending_layers, []
        for target in self._active:
            assert target.step_blocks is not None
            start, end, local, remote = target.step_blocks
            note = KVPushNote(target.request_id, tuple(layers), start, end)
            try:
                ranges = self.connector.ranges(target.peer, layers, local, remote)
                target.handles.append(self._submit(target, ranges, note))
                self.bytes_submitted += ranges.total_bytes
            except TransferError as e:
                target.error = target.error or str(e)

    def wait_for_save(self, plan: SchedulerOutput) -> None:
        for target in self._active:
            for handle in target.handles:
                try:
                    handle.wait()
                except TransferError as e:
                    target.error = target.error or str(e)
                finally:
                    handle.release()
            target.handles.clear()
            target.step_blocks = None
        self._active = []

    def step_committed(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                target = self._targets.get(out.request_id)
            if target is None or not (out.token_ids or out.finished):
                continue
            self.forget(out.request_id)
            first = out.token_ids[0] if out.token_ids else None
            error = target.error if first is not None else (target.error or "the prefill ended without a token")
            total = len(target.remote_blocks)
            note = KVPushNote(target.request_id, tuple(range(self.connector.layout.num_layers)), 0, total,
                              final=True, first_token_id=first, error=error)
            empty = self.connector.ranges(target.peer, [], [], [])
            try:
                with self._submit(target, empty, note) as handle:
                    handle.wait()
            except TransferError as e:
                log.warning("could not deliver the final KV note of %s: %s", out.request_id, e)

    def _submit(self, target: _Target, ranges: Ranges, note: KVPushNote) -> BatchHandle:
        return self.connector.transfer.submit_ranges(
            TransferOp.WRITE, self.connector.segment_name, target.peer.segment.name, ranges,
            notify=NotifySpec(kv_tag(target.request_id), note.encode()), timeout_s=target.timeout_s)
