"""The passive side of bench.transfer, in its own process: one registered segment (every backend
available) and a raw-socket sink for the socket ceiling. Prints one JSON line when ready, then
serves until stdin closes."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import threading

import torch

from common.settings import kv_secret_variable
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig
from kv_transfer.peer_link import tune_socket


def raw_socket_sink(server: socket.socket, buffer: torch.Tensor) -> None:
    """Per message: 8-byte length, then that many bytes received straight into `buffer`; replies 1 byte."""
    view = buffer.numpy().data.cast("B")
    while True:
        conn, _ = server.accept()
        tune_socket(conn)
        with conn:
            while header := conn.recv(8, socket.MSG_WAITALL):
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
    engine = TransferEngine(store, TransferEngineConfig(engine_id="bench-target", metadata_prefix=args.prefix,
                                                        link_secret=secret.encode() if secret else None,
                                                        seal_payloads=args.integrity == "all"))
    segment = engine.allocate_host_buffer(args.size, "bench")
    await engine.register_segment("bench-target", segment)
    sink_buffer = torch.empty(args.size, dtype=torch.uint8)
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_socket_sink, args=(server, sink_buffer), daemon=True).start()
    print(json.dumps({"ready": engine.engine_id, "raw_port": server.getsockname()[1],
                      "backends": list(engine.backends)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await engine.close()
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--integrity", choices=("all", "frames"), default="all")
    asyncio.run(main(parser.parse_args()))
