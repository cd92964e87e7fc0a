"""The passive side of bench.transfer, in its own process: one registered segment (every backend
available) and a raw-socket sink for the socket ceiling (and a TLS one, with `--tls-dir`). Prints
one JSON line when ready, then serves until stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import struct
import sys
import threading
from pathlib import Path

import torch

from common.settings import kv_secret_variable
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig
from kv_transfer.link_tls import LinkTls
from kv_transfer.peer_link import tune_socket


def link_tls(directory: str | None) -> LinkTls | None:
    """The files common.pki.make_pki wrote under `directory`/cluster (bench.transfer --tls)."""
    if directory is None:
        return None
    folder = Path(directory) / "cluster"
    return LinkTls(str(folder / "ca.pem"), str(folder / "cert.pem"), str(folder / "key.pem"))


def _header(conn: socket.socket) -> bytes:
    """8 bytes, or b"" at EOF (a TLS socket takes no MSG_WAITALL)."""
    header = b""
    while len(header) < 8:
        chunk = conn.recv(8 - len(header))
        if not chunk:
            return b""
        header += chunk
    return header


def raw_socket_sink(server: socket.socket, buffer: torch.Tensor, context: ssl.SSLContext | None = None) -> None:
    """Per message: 8-byte length, then that many bytes received straight into `buffer`; replies 1 byte.
    With `context`: each connection is TLS first."""
    view = buffer.numpy().data.cast("B")
    while True:
        conn, _ = server.accept()
        tune_socket(conn)
        if context is not None:
            try:
                conn = context.wrap_socket(conn, server_side=True)
            except OSError:  # a caller that failed TLS: wait for the next
                continue
        with conn:
            while header := _header(conn):
                (n,) = struct.unpack("!Q", header)
                got = 0
                while got < n:
                    k = conn.recv_into(view[got:n])
                    if k == 0:
                        return
                    got += k
                conn.sendall(b"k")


async def main(args: argparse.Namespace) -> None:
    store = EtcdStore(args.etcd)
    secret = kv_secret_variable()  # bench.transfer --authenticated
    tls = link_tls(args.tls_dir)
    engine = TransferEngine(store, TransferEngineConfig(engine_id="bench-target", metadata_prefix=args.prefix,
                                                        link_secret=secret.encode() if secret else None,
                                                        seal_payloads=args.integrity == "all", link_tls=tls))
    segment = engine.allocate_host_buffer(args.size, "bench")
    await engine.register_segment("bench-target", segment)
    sink_buffer = torch.empty(args.size, dtype=torch.uint8)
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_socket_sink, args=(server, sink_buffer), daemon=True).start()
    ready = {"ready": engine.engine_id, "raw_port": server.getsockname()[1], "backends": list(engine.backends)}
    if tls is not None:
        tls_server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=raw_socket_sink, args=(tls_server, sink_buffer, tls.server_context),
                         daemon=True).start()
        ready["tls_port"] = tls_server.getsockname()[1]
    print(json.dumps(ready), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await engine.close()
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--integrity", choices=("all", "frames"), default="all")
    parser.add_argument("--tls-dir", help="a common.pki folder: links are mutual TLS")
    asyncio.run(main(parser.parse_args()))
