"""NIXL (UCX underneath): one-sided READ/WRITE between registered segments, CPU or CUDA memory, on one
host (UCX picks shared memory / CMA) or across hosts (RDMA, TCP).

Metadata travels only through our `SegmentDescriptor`: a segment's endpoint carries the owner's full
NIXL agent metadata taken right after registering it. NIXL's own listener and etcd are never used.
Each transfer carries a NIXL notification, which NIXL sends only once all of the transfer's bytes
moved; the target's poller turns it into a `Notification` in its inbox (for READ too). A transfer
that errs or is cancelled (deadline passed, handle released) sends none: the initiator then tells
the target through the peer link, with ok=False.

UCX runs with `ucx_error_handling_mode=none` by default (needed for shared memory on one host), so
UCX does not watch for dead peers: the engine's deadlines and peer link cover that (a post towards
a vanished process may still fail with NIXL's disconnect error: that becomes PeerLostError).

Environment, set on import only where not already set (a deployment sets its own before importing):
  UCX_NET_DEVICES=lo, UCX_MODULES=^ib  -- loopback only, no InfiniBand (multi-host RDMA needs both
                                          set explicitly, e.g. UCX_NET_DEVICES=mlx5_0:1, UCX_MODULES=)
  NIXL_LOG_LEVEL=WARN                  -- NIXL logs INFO lines to stdout otherwise

Threads: one poller per backend posts batches, polls their state and the agent's notifications
(every 50 us while a batch is in flight, backing off to 2 ms when idle). Every call into the agent
holds `_agent_lock`: the agent runs without its own locking or progress thread (NIXL's spins a core
at the Python API's settings), so the poller drives UCX progress on both sides.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.settings import apply_ucx_defaults, ucx_net_devices
from kv_transfer.backends.base import Backend, BackendContext
from kv_transfer.batch import Batch
from kv_transfer.datatypes import BatchStatus, Notification, SegmentDescriptor, TransferOp
from kv_transfer.errors import BackendUnavailableError, PeerLostError, TransferError
from kv_transfer.segment import LocalSegment

apply_ucx_defaults()

# Not installed: not available. Installed but not importable (a missing CUDA wheel, bad libraries):
# an error, raised where the backend is looked at, so a broken install never passes for an absent one.
NIXL_INSTALLED = importlib.util.find_spec("nixl") is not None
_import_error: BaseException | None = None
nixl_agent: Any = None
nixl_agent_config: Any = None
if NIXL_INSTALLED:
    try:
        from nixl import _api as _nixl_api

        nixl_agent, nixl_agent_config = _nixl_api.nixl_agent, _nixl_api.nixl_agent_config
    except Exception as e:
        _import_error = e

log = logging.getLogger(__name__)

_BUSY_SLEEP_S = 50e-6  # between polls while a live batch is in flight
_IDLE_MIN_S = 100e-6  # notification polling backs off from this ...
_IDLE_MAX_S = 2e-3  # ... to this while nothing arrives
_ABANDONED_POLL_S = 10e-3  # transfers of already-failed batches that could not be cancelled
_NOTIF_HEAD = struct.Struct("!4sHHI")  # magic, batch-id bytes, tag bytes, message bytes
_NOTIF_MAGIC = b"TKV1"


def encode_notif(batch_id: str, tag: str, message: bytes) -> bytes:
    """The NIXL notification of one batch: a fixed header, then batch id, tag (UTF-8) and message."""
    bid, tg = batch_id.encode(), tag.encode()
    return _NOTIF_HEAD.pack(_NOTIF_MAGIC, len(bid), len(tg), len(message)) + bid + tg + message


def decode_notif(raw: bytes) -> tuple[str, str, bytes]:
    """Inverse of `encode_notif`; raises ValueError on anything else."""
    if len(raw) < _NOTIF_HEAD.size:
        raise ValueError("notification too short")
    magic, n_bid, n_tag, n_msg = _NOTIF_HEAD.unpack_from(raw)
    if magic != _NOTIF_MAGIC or len(raw) != _NOTIF_HEAD.size + n_bid + n_tag + n_msg:
        raise ValueError("not a Tandem notification")
    body = raw[_NOTIF_HEAD.size:]
    return body[:n_bid].decode(), body[n_bid:n_bid + n_tag].decode(), bytes(body[n_bid + n_tag:])


@dataclass(frozen=True)
class _RemoteAgent:
    """What we loaded of a peer's agent: its `instance` (one per agent object, so a restarted engine
    with the same id differs), `generation` (bumped per (de)registration) and `dereg_epoch`
    (bumped per deregistration: merging metadata cannot drop a segment, only a reload can)."""

    instance: str
    generation: int
    dereg_epoch: int


@dataclass(eq=False)
class _Xfer:
    batch: Batch
    handle: Any
    next_check: float = 0.0


class NixlBackend(Backend):
    name = "nixl"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self._init_lock = threading.Lock()
        self._agent_lock = threading.Lock()  # guards the agent and the maps below
        self._agent: Any = None  # created on first need (about 0.5 s)
        self._agent_error: str | None = None
        self._instance = uuid.uuid4().hex
        self._generation = 0
        self._dereg_epoch = 0
        self._registrations: dict[str, Any] = {}  # local segment name → its nixlRegDList
        self._remotes: dict[str, _RemoteAgent] = {}  # peer agent name → what we loaded
        self._cond = threading.Condition()
        self._to_post: deque[Batch] = deque()  # guarded by _cond
        self._active: list[_Xfer] = []  # touched only by the poller (and by close after joining it)
        self._closed = False
        self._poller: threading.Thread | None = None

    @classmethod
    def is_available(cls) -> bool:
        """NIXL is installed and UCX is confined to the devices the environment names. Raises
        BackendUnavailableError when NIXL is installed but does not import."""
        if _import_error is not None:
            raise BackendUnavailableError(f"NIXL is installed but does not import ({type(_import_error).__name__}: "
                                          f"{_import_error}): repair the install (scripts/setup.sh) or uninstall it")
        return nixl_agent is not None and ucx_net_devices() is not None

    # -- agent ----------------------------------------------------------------------------------------
    def _ensure_agent(self) -> Any:
        with self._init_lock:
            if self._agent is not None:
                return self._agent
            if self._agent_error is not None or self._closed:
                raise TransferError(f"NIXL agent unavailable: {self._agent_error or 'backend closed'}")
            try:
                config = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
                agent = nixl_agent(self.ctx.engine_id, config)
                agent.create_backend("UCX", dict(self.ctx.config.nixl_backend_params))
            except Exception as e:  # NIXL's errors share no base but Exception
                self._agent_error = f"{type(e).__name__}: {e}"
                raise TransferError(f"could not create the NIXL agent: {self._agent_error}") from e
            self._agent = agent
            self._poller = threading.Thread(target=self._run, name=f"kv-nixl-{self.ctx.engine_id}", daemon=True)
            self._poller.start()
            return agent

    # -- segments -------------------------------------------------------------------------------------
    def segment_endpoint(self, segment: LocalSegment) -> dict | None:
        try:
            agent = self._ensure_agent()
        except TransferError as e:
            log.warning("NIXL cannot serve segment %s: %s", segment.name, e)
            return None
        descs = np.array([[segment.address, segment.length, segment.device_id]], dtype=np.int64)
        with self._agent_lock:
            try:
                reg = agent.register_memory(descs, _mem_type(segment.device))
            except Exception as e:
                log.warning("NIXL cannot register segment %s (%s): %s", segment.name, segment.device, e)
                return None
            self._registrations[segment.name] = reg
            self._generation += 1
            metadata = agent.get_agent_metadata()  # after registering: covers this segment
            return {"agent": agent.name, "instance": self._instance, "generation": self._generation,
                    "dereg_epoch": self._dereg_epoch, "metadata": base64.b64encode(metadata).decode()}

    def forget_segment(self, segment: LocalSegment) -> None:
        with self._agent_lock:
            reg = self._registrations.pop(segment.name, None)
            if reg is None or self._agent is None:
                return
            try:
                self._agent.deregister_memory(reg)
            except Exception as e:
                log.warning("NIXL could not deregister segment %s: %s", segment.name, e)
            self._generation += 1
            self._dereg_epoch += 1

    # -- peers ----------------------------------------------------------------------------------------
    def can_reach(self, local: LocalSegment, remote: SegmentDescriptor) -> bool:
        endpoint = remote.endpoints.get("nixl")
        with self._agent_lock:
            return (endpoint is not None and local.name in self._registrations
                    and (endpoint["agent"] == self.ctx.engine_id or endpoint["agent"] in self._remotes))

    def connect(self, remote: SegmentDescriptor) -> None:
        endpoint = remote.endpoints.get("nixl")
        if endpoint is None:
            raise TransferError(f"segment {remote.name!r} of {remote.owner} has no NIXL endpoint")
        agent = self._ensure_agent()
        name = str(endpoint["agent"])
        if name == self.ctx.engine_id:
            return  # loopback: our own agent knows its memory
        seen = _RemoteAgent(str(endpoint["instance"]), int(endpoint["generation"]), int(endpoint["dereg_epoch"]))
        with self._agent_lock:
            known = self._remotes.get(name)
            if known is not None and known.instance == seen.instance and (
                    seen.dereg_epoch < known.dereg_epoch
                    or (seen.dereg_epoch == known.dereg_epoch and seen.generation <= known.generation)):
                return  # what we hold is a later snapshot of the same agent: it covers this segment
            reload = known is not None and (known.instance != seen.instance or seen.dereg_epoch > known.dereg_epoch)
            try:
                if reload:  # merging cannot drop the peer's deregistered memory: start from scratch
                    agent.remove_remote_agent(name)
                    del self._remotes[name]
                agent.add_remote_agent(base64.b64decode(endpoint["metadata"]))
            except Exception as e:
                raise TransferError(f"NIXL could not load the metadata of {remote.owner}: {e}") from e
            self._remotes[name] = seen

    def disconnect(self, remote: SegmentDescriptor) -> None:
        endpoint = remote.endpoints.get("nixl")
        if endpoint is None:
            return
        with self._agent_lock:
            if self._remotes.pop(str(endpoint["agent"]), None) is None or self._agent is None:
                return
            try:
                self._agent.remove_remote_agent(str(endpoint["agent"]))
            except Exception as e:
                log.info("NIXL could not forget agent %s: %s", endpoint["agent"], e)

    # -- batches --------------------------------------------------------------------------------------
    def start(self, batch: Batch) -> None:
        with self._cond:
            if self._closed:
                batch.fail(PeerLostError("the NIXL backend was closed"))
                return
            self._to_post.append(batch)
            self._cond.notify()

    def _run(self) -> None:
        idle_s = _IDLE_MIN_S
        while True:
            with self._cond:
                if not self._to_post and not self._active and not self._closed:
                    self._cond.wait(idle_s)
                if self._closed:
                    return
                to_post = list(self._to_post)
                self._to_post.clear()
            try:
                for batch in to_post:
                    self._post(batch)
                live = self._poll_transfers()
                got = self._poll_notifs()
            except Exception:  # a bug here must not silently stop every transfer of this engine
                log.exception("NIXL poller iteration failed")
                live, got = bool(self._active), False
            idle_s = _IDLE_MIN_S if got or to_post else min(2 * idle_s, _IDLE_MAX_S)
            if live:
                time.sleep(_BUSY_SLEEP_S)
            elif self._active:  # only abandoned transfers left: no need to spin
                with self._cond:
                    if not self._to_post and not self._closed:
                        self._cond.wait(_ABANDONED_POLL_S)

    def _post(self, batch: Batch) -> None:
        if batch.status is not BatchStatus.PENDING:
            return
        remote_agent = str(batch.remote.endpoints["nixl"]["agent"])
        r = batch.ranges
        local = _descs(batch.local.address, r.local_offsets, r.lengths, batch.local.device_id)
        remote = _descs(batch.remote.address, r.remote_offsets, r.lengths, batch.remote.device_id)
        op = "WRITE" if batch.op is TransferOp.WRITE else "READ"
        with self._agent_lock:
            agent = self._agent
            try:
                handle = agent.initialize_xfer(
                    op, agent.get_xfer_descs(local, _mem_type(batch.local.device)),
                    agent.get_xfer_descs(remote, _mem_type(batch.remote.device)), remote_agent,
                    encode_notif(batch.batch_id, batch.notify.tag, batch.notify.message))
                state = agent.transfer(handle)
            except Exception as e:
                state, error = "ERR", e
        if state == "PROC":
            self._active.append(_Xfer(batch, handle))
            return
        if handle is not None:
            self._release(handle)
        if state == "DONE":
            batch.complete()
        else:
            batch.fail(self._error(batch, "could not start", error))

    def _poll_transfers(self) -> bool:
        """Check in-flight transfers; returns whether any still belongs to a pending batch."""
        now = time.monotonic()
        due = [x for x in self._active if x.next_check <= now]
        if not due:
            return False
        with self._agent_lock:
            states = [(x, _state(self._agent, x.handle)) for x in due]
        live = False
        for xfer, state in states:
            if state == "PROC":
                if xfer.batch.status is BatchStatus.PENDING:
                    live = True
                elif self._release(xfer.handle):  # the batch expired or was released: cancelled
                    self._active.remove(xfer)
                    self.notify_failure(xfer.batch, str(xfer.batch.error))
                else:
                    xfer.next_check = now + _ABANDONED_POLL_S
                continue
            self._active.remove(xfer)
            self._release(xfer.handle)
            if state == "DONE":
                xfer.batch.complete()
            else:
                self._fail(xfer.batch)
        return live

    # NIXL sends a transfer's notification only once all its bytes moved: after an error or a
    # cancel the target hears nothing from NIXL, so it is told through the peer link.
    def _fail(self, batch: Batch) -> None:
        error = self._error(batch, "failed", None)
        if batch.fail(error):
            self.notify_failure(batch, str(error))

    def _error(self, batch: Batch, what: str, cause: Exception | None) -> TransferError:
        """PeerLostError when NIXL or the peer link says the peer is gone, else TransferError."""
        text = f"NIXL {batch.op.value} of segment {batch.remote.name!r} of {batch.remote.owner} {what}"
        if cause is not None:
            text += f": {type(cause).__name__}: {cause}"
        gone = type(cause).__name__ == "nixlRemoteDisconnectError"  # its class lives in nixl_cu12 or nixl_cu13
        if gone or not self.ctx.link.is_connected(batch.remote.owner):
            return PeerLostError(text)
        return TransferError(text)

    def _release(self, handle: Any) -> bool:
        with self._agent_lock:
            try:
                self._agent.release_xfer_handle(handle)
            except Exception as e:  # still in flight and not cancellable yet
                log.debug("NIXL transfer handle not released yet: %s", e)
                return False
        return True

    def _poll_notifs(self) -> bool:
        with self._agent_lock:
            try:
                notifs: dict[str, list[bytes]] = self._agent.get_new_notifs()
            except Exception as e:
                log.warning("NIXL notification poll failed: %s", e)
                return False
        for peer, messages in notifs.items():
            for raw in messages:
                try:
                    batch_id, tag, message = decode_notif(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    log.warning("dropping a NIXL notification from %s: %s", peer, e)
                    continue
                self.ctx.inbox.deliver(Notification(peer=peer, batch_id=batch_id, tag=tag, message=message, ok=True))
        return bool(notifs)

    # -- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._to_post)
            self._to_post.clear()
            self._cond.notify_all()
        if self._poller is not None:
            self._poller.join(timeout=5)
        for batch in pending:
            batch.fail(PeerLostError("the NIXL backend was closed"))
        for xfer in self._active:
            xfer.batch.fail(PeerLostError("the NIXL backend was closed"))
            self._release(xfer.handle)
        self._active.clear()
        with self._init_lock, self._agent_lock:
            if self._agent is None:
                return
            for name, reg in self._registrations.items():
                try:
                    self._agent.deregister_memory(reg)
                except Exception as e:
                    log.warning("NIXL could not deregister segment %s: %s", name, e)
            self._registrations.clear()
            self._remotes.clear()
            self._agent = None  # the agent object frees UCX when collected


def _mem_type(device: str) -> str:
    return "VRAM" if device == "cuda" else "DRAM"


def _descs(base: int, offsets: np.ndarray, lengths: np.ndarray, device_id: int) -> np.ndarray:
    """Nx3 (address, length, device id) rows, as NIXL takes them."""
    return np.stack([base + offsets, lengths, np.full(len(lengths), device_id, dtype=np.int64)], axis=1)


def _state(agent: Any, handle: Any) -> str:
    try:
        return str(agent.check_xfer_state(handle))
    except Exception as e:
        log.warning("NIXL transfer state check failed: %s", e)
        return "ERR"

