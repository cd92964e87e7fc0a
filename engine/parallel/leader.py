"""Rank 0's side of a tensor-parallel group: starts ranks 1..N-1 (engine.tp_follower) as child processes
that die with it, joins their process group, sends them each step, and watches them: a rank that exits ends the
group (`lost`; every later step raises EngineDeadError), and whoever serves the engine hears it (`on_lost`)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from common.settings import cuda_visible_devices, environment_with
from engine.config import EngineConfig
from engine.errors import EngineDeadError, ModelLoadError, RankCommandError
from engine.kv_offload_mirror import TierCopy
from engine.parallel.group import COLLECTIVE_TIMEOUT, TPGroup, open_store
from engine.parallel.protocol import FollowerStart, FollowerStep, RankCommand, RankPlugin, encode_frame, write_frame

log = logging.getLogger(__name__)

READY_KEY = "tandem/tp/ready/{rank}"  # a rank's engine parts are built: "ok", or why not
# a rank's reply to a RankCommand, JSON ["ok", value] or ["error", message] (never unpickled: the store's port is
# reachable by whoever reaches this host)
REPLY_KEY = "tandem/tp/reply/{seq}/{rank}"


class TPLeader:
    def __init__(self, config: EngineConfig, device: torch.device, context_of: int | None,
                 plugin: RankPlugin | None = None) -> None:
        size = config.tensor_parallel_size
        self._store = open_store(0, size, 0)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closing = False
        self._send_lock = threading.Lock()  # steps (the engine thread) and commands (any thread) interleave whole
        self._lost_lock = threading.Lock()
        self._seq = itertools.count()
        # reply keys of commands that timed out: each is deleted once its reply lands (`_sweep_late`)
        self.late_replies: set[str] = set()
        self._late_lock = threading.Lock()
        self.lost: str | None = None
        # what each message also carries: the KV offload tier's copies since the last (engine.kv_offload_mirror)
        self.tier_copies: Callable[[], tuple[TierCopy, ...]] | None = None
        self.on_lost: list[Callable[[str], None]] = []
        envs = [_rank_env(rank, device) for rank in range(1, size)]  # (refused before any rank starts)
        try:
            for rank, env in enumerate(envs, start=1):
                # not common.processes.spawn: its death signal fires when the spawning *thread* ends, and an engine
                # may be built on a passing thread. A rank ends when its stdin closes instead, which rank 0's exit does
                proc = subprocess.Popen([sys.executable, "-m", "engine.tp_follower"], stdin=subprocess.PIPE, env=env)
                self._procs.append(proc)
                assert proc.stdin is not None
                write_frame(proc.stdin, FollowerStart(config, rank, size, self._store.port, context_of, plugin))
            self.group = TPGroup(self._store, 0, size, device, config.tensor_parallel_shared_memory, tuple(self.pids))
        except BaseException:
            self.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="tp-ranks", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def wait_ready(self) -> None:
        """Return once every rank has built its shard; raise ModelLoadError with a rank's reason if one could not."""
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds() * 5
        waiting = set(range(1, len(self._procs) + 1))
        while waiting:
            for rank in sorted(waiting):
                key = READY_KEY.format(rank=rank)
                if self._store.check([key]):
                    answer = self._store.get(key).decode()
                    if answer != "ok":
                        self.close()
                        raise ModelLoadError(f"tensor-parallel rank {rank} could not load: {answer}")
                    waiting.discard(rank)
            if self.lost is not None or time.monotonic() > deadline:
                self.close()
                raise ModelLoadError(f"tensor-parallel ranks {sorted(waiting)} did not load: "
                                     f"{self.lost or 'timed out'}")
            time.sleep(0.02)

    def send(self, step: FollowerStep | RankCommand) -> None:
        """Hand every other rank the step rank 0 is about to run (or a command)."""
        self.check()
        try:
            with self._send_lock:
                # (in the order messages go out; commands carry them too: one may open blocks whose store is logged
                # to writes from other workers, as a decode group's page grants do)
                if self.tier_copies is not None:
                    if isinstance(step, RankCommand):  # a body that cannot be sent fails before the copies are taken
                        encode_frame(step)
                    step = replace(step, tier_copies=self.tier_copies())
                frame = encode_frame(step)
                for proc in self._procs:
                    assert proc.stdin is not None
                    write_frame(proc.stdin, frame)
        except (OSError, ValueError) as exc:  # (ValueError: the group was closed meanwhile)
            raise EngineDeadError(f"a tensor-parallel rank is gone: {self.lost or exc}") from exc

    def abandon(self, why: str) -> None:
        """Rank 0 left a step its ranks entered (it raised mid-forward): they wait in a collective no later step
        may meet, so the group ends and every later step raises EngineDeadError."""
        deadline = time.monotonic() + 1.0  # a rank that died mid-step is the likely cause: name it if it is
        while time.monotonic() < deadline and all(proc.poll() is None for proc in self._procs):
            time.sleep(0.02)
        dead = [(rank, proc) for rank, proc in enumerate(self._procs, start=1) if proc.poll() is not None]
        try:
            self._mark_lost(f"rank {dead[0][0]} (pid {dead[0][1].pid}) exited with code {dead[0][1].returncode}"
                            if dead else f"rank 0 left a step: {why}")
        finally:
            self.close()

    def _mark_lost(self, why: str) -> None:
        """The group serves no more: said once, to the log and to every `on_lost` listener."""
        with self._lost_lock:
            if self.lost is not None:
                return
            self.lost = why
        group = getattr(self, "group", None)  # (a rank may be lost before the group is made)
        if group is not None:
            group.abort()
        log.error("tensor-parallel %s: the engine serves no more", why)
        for callback in self.on_lost:
            try:
                callback(why)
            except Exception:  # one listener's failure neither silences the others nor the watcher
                log.exception("a listener of the lost tensor-parallel group failed")

    def command(self, body: object, wait: bool = True, timeout_s: float = 30.0) -> list[object]:
        """Hand `body` to every other rank's RankServices (after the step it is running, if any); with `wait`,
        their replies in rank order (blocks: call it off the event loop). Raises RankCommandError with a rank's
        reason, EngineDeadError if a rank is gone."""
        self._sweep_late()
        seq = next(self._seq)
        self.send(RankCommand(seq, body, wait))
        if not wait:
            return []
        replies: list[object] = []
        failures: list[str] = []
        deadline = time.monotonic() + timeout_s
        ranks = range(1, len(self._procs) + 1)
        for rank in ranks:  # (every rank's reply read: none is left in the store)
            key = REPLY_KEY.format(seq=seq, rank=rank)
            while not self._store.check([key]):
                self.check()
                if time.monotonic() > deadline:
                    with self._late_lock:  # (this rank's reply and those not read yet may still come)
                        self.late_replies.update(REPLY_KEY.format(seq=seq, rank=r) for r in ranks if r >= rank)
                    raise RankCommandError(f"tensor-parallel rank {rank} did not answer within {timeout_s} s")
                time.sleep(0.001)
            try:
                status, value = json.loads(self._store.get(key))
            except ValueError as exc:
                status, value = "error", f"an unreadable reply: {exc}"
            self._store.delete_key(key)
            if status != "ok":
                failures.append(f"tensor-parallel rank {rank}: {value}")
            replies.append(value)
        if failures:
            raise RankCommandError("; ".join(failures))
        return replies

    def _sweep_late(self) -> None:
        """Delete the replies that came after their commands timed out."""
        with self._late_lock:
            for key in [key for key in self.late_replies if self._store.check([key])]:
                self._store.delete_key(key)
                self.late_replies.discard(key)

    @property
    def store_port(self) -> int:
        """The group's rendezvous store's port on 127.0.0.1 (it also carries the commands' replies)."""
        return int(self._store.port)

    def check(self) -> None:
        if self.lost is not None:
            raise EngineDeadError(f"the tensor-parallel group is broken: {self.lost}")

    def _watch(self) -> None:
        while not self._closing:
            for rank, proc in enumerate(self._procs, start=1):
                code = proc.poll()
                if code is not None and not self._closing:
                    self._mark_lost(f"rank {rank} (pid {proc.pid}) exited with code {code}")
            time.sleep(0.1)

    def close(self) -> None:
        """End the other ranks (their stdin closes; SIGKILL after a grace period). Idempotent."""
        self._closing = True
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rank_env(rank: int, device: torch.device) -> dict[str, str]:
    """The rank's environment: on CUDA it sees only its own device (the rank-th of those rank 0 may use)."""
    if device.type != "cuda":
        return environment_with()
    visible = cuda_visible_devices()
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if rank >= len(devices):
        raise ModelLoadError(f"tensor-parallel rank {rank} has no CUDA device (visible: {devices})")
    return environment_with(CUDA_VISIBLE_DEVICES=devices[rank])
