"""Drive `tests/support/kv_peer.py` processes from a test."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.processes import spawn

REPO = Path(__file__).resolve().parents[2]


class PeerProcess:
    """A `python -m <module> <args>` child speaking JSON lines; it announces {"ready": engine id}."""

    def __init__(self, module: str, args: list[str], name: str, threads: int = 1,
                 env_extra: dict[str, str] | None = None) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(REPO), "UCX_NET_DEVICES": "lo", "UCX_MODULES": "^ib",
               "OMP_NUM_THREADS": str(threads), **(env_extra or {})}
        self.proc = spawn([sys.executable, "-m", module, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, cwd=REPO, env=env)
        ready = self.read(timeout=120)
        assert "ready" in ready, ready
        self.engine_id = ready["ready"]

    def send(self, **cmd: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"peer {self.name} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {self.name} exited (rc={self.proc.poll()})")
        return dict(json.loads(line))

    def call(self, reply_within: float = 60.0, **cmd: object) -> dict:
        self.send(**cmd)
        return self.read(reply_within)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time of the kill."""
        self.proc.send_signal(signal.SIGKILL)
        t = time.monotonic()
        self.proc.wait(timeout=10)
        self._close_pipes()
        return t

    def close(self) -> None:
        """End the child (stdin EOF, then SIGKILL after 10 s) and close our pipes."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()


class KVPeer(PeerProcess):
    """tests/support/kv_peer.py: one segment of seeded random bytes."""

    def __init__(self, etcd: str, name: str, size: int, seed: int, backends: list[str], prefix: str,
                 secret: str | None = None, guarded: bool = False) -> None:
        """`secret`: the KV link secret it authenticates with (TANDEM_KV_SECRET); `guarded`: its
        segment takes two-sided batches only inside grants (kv_transfer.grants)."""
        self.size, self.seed = size, seed
        super().__init__("tests.support.kv_peer", ["--etcd", etcd, "--name", name, "--size", str(size),
                                                   "--seed", str(seed), "--prefix", prefix, "--backends", *backends,
                                                   *(["--guarded"] if guarded else [])],
                         name, env_extra={"TANDEM_KV_SECRET": secret} if secret else None)

    def contents(self, tmp_path: Path) -> np.ndarray:
        path = tmp_path / f"{self.name}.bin"
        assert self.call(cmd="dump", path=str(path))["ok"]
        return np.fromfile(path, dtype=np.uint8)
