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
    # this step's blocks, per group with any (engine.kv_groups): (group, start, end in remote_blocks, local ids,
    # remote ids)
    step_blocks: list[tuple[int, int, int, list[int], list[int]]] = field(default_factory=list)
    handles: list[BatchHandle] = field(default_factory=list)


DEFAULT_MIN_BATCH_BYTES = 4 << 20


def should_flush(layer: int, num_layers: int, pending_bytes: int, min_batch_bytes: int) -> bool:
    """Layers are pushed in groups of at least `min_batch_bytes` (every batch costs a notification
    and a few hundred µs of overhead), and always at the last layer."""
    return layer == num_layers - 1 or pending_bytes >= min_batch_bytes


class KVPusher:
    """Attach with `engine.set_kv_hook(pusher)`; call `expect` before adding each request to push.

    As layers finish, their pages go out in groups of at least `min_batch_bytes` (0: one batch
    per layer): a WRITE per request per group, whose note names the layers and blocks it carries. In a
    hybrid layout (engine.kv_groups) a request's remote blocks are every group's in turn, and a batch's
    layers are pool layers (slots) of one group: a WRITE per request per group per layer group.
    """

    def __init__(self, connector: KVConnector, block_size: int,
                 min_batch_bytes: int = DEFAULT_MIN_BATCH_BYTES) -> None:
        self.connector = connector
        self.block_size = block_size
        self.min_batch_bytes = min_batch_bytes
        self._targets: dict[str, _Target] = {}
        self._active: list[_Target] = []
        self._pending_layers: list[int] = []
        self._pending_bytes = 0
        self._group_layer_bytes: list[int] = []  # per group: bytes of one of its layers' pages across the targets
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
        groups = self.connector.groups
        with self._lock:
            for item in plan.scheduled:
                target = self._targets.get(item.seq.request_id)
                if target is None or target.error is not None:
                    continue
                target.step_blocks = []
                per_group = len(target.remote_blocks) // groups.num_groups
                end_token = item.start + item.num_tokens - len(item.draft_token_ids)
                start = min(target.next_block, item.start // self.block_size)
                end = min(-(-end_token // self.block_size), per_group)
                if end <= start:
                    continue
                target.next_block = end_token // self.block_size
                for group, table in enumerate(item.seq.tables):
                    first = group * per_group
                    # blocks the decode side does not need (a windowed group's behind the window there) are not sent
                    pairs = [(local, remote) for local, remote in zip(
                        table[start:end], target.remote_blocks[first + start:first + end], strict=True)
                        if remote != NOT_NEEDED]
                    if pairs:
                        target.step_blocks.append((group, first + start, first + end, [p[0] for p in pairs],
                                                   [p[1] for p in pairs]))
                if target.step_blocks:
                    self._active.append(target)
        self._pending_layers, self._pending_bytes = [], 0
        self._group_layer_bytes = [0] * groups.num_groups
        for target in self._active:
            for group, _, _, local, _ in target.step_blocks:
                self._group_layer_bytes[group] += len(local) * self.connector.layout.block_bytes
        return bool(self._active)

    def layer_written(self, layer: int) -> None:
        """Model layer `layer`'s pages are written: pushed with the layers pending before it once they add up."""
        groups = self.connector.groups
        self._pending_layers.append(layer)
        self._pending_bytes += self._group_layer_bytes[groups.placement[layer][0]]
        if not should_flush(layer, len(groups.placement), self._pending_bytes, self.min_batch_bytes):
            return
        slots = groups.layers_by_group(self._pending_layers)
        self._pending_layers, self._pending_bytes = [], 0
        for target in self._active:
            for group, start, end, local, remote in target.step_blocks:
                if group not in slots:
                    continue
                note = KVPushNote(target.request_id, tuple(slots[group]), start, end)
                try:
                    ranges = self.connector.ranges(target.peer, slots[group], local, remote)
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
            target.step_blocks = []
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
