"""Transfer-engine bandwidth per backend, beside two ceilings measured in the same run.

    python -m bench.transfer [--size-mib 256] [--repeats 5] [--backends shm tcp nixl]
                             [--authenticated [--integrity all|frames]] [--tls] [--json out.json]

`--authenticated`: both engines hold a KV link secret (kv_transfer.link_auth), as `tandem up`'s do,
so every connection is authenticated and sealed (kv_transfer.channel): every frame and, with
`--integrity all` (the default, as `--kv-link-integrity`'s), every payload byte.
`--tls`: the links are mutual TLS 1.3 (kv_transfer.link_tls, as with `--tls-*`) under a throwaway
PKI, and a third ceiling is measured: the raw socket wrapped in the same TLS.

Two processes on this host: this one (initiator) and bench/transfer_peer.py (the segment owner),
metadata through a local etcd. Payloads (WRITE, initiator → owner):
  - `4MiB`: the buffer as 4 MiB descriptors;
  - `kv-coalesced`: the default model's KV pages (one block of one layer each) for requests of
    32 blocks (a 512-token prompt) whose blocks are consecutive on both sides, coalesced by the
    connector into one range per layer and request;
  - `kv-scattered`: the same pages with random block ids on both sides (nothing coalesces).
Ceilings: one torch copy between two memfd buffers of two processes (the owner's mapped here),
and a raw loopback socket `sendall` into the owner's `recv_into`. Also the end-to-end time to
push a 512-token prompt's KV the way the prefill worker does: WRITE batches of finished layers,
grouped to >= 4 MiB (`KVPusher`'s default), all waited. GB/s are bytes / median wall time of
`--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.timing import median_seconds
from bench.transfer_peer import link_tls
from common.etcd.local import running_etcd
from common.pki import make_pki
from common.processes import spawn
from common.settings import apply_ucx_defaults, child_environment
from engine.loader.api import load_model
from kv_transfer import EtcdStore, Ranges, RemoteSegment, TransferEngine, TransferEngineConfig, TransferOp
from kv_transfer.kv_layout import POOL_LAYOUT, KVLayout, block_ranges
from kv_transfer.kv_push import DEFAULT_MIN_BATCH_BYTES, should_flush
from kv_transfer.peer_link import tune_socket
from kv_transfer.segment import map_peer_buffer

BLOCKS_PER_REQUEST = 32  # 512 tokens of 16


@dataclass(frozen=True)
class Row:
    name: str
    payload: str
    bytes: int
    descriptors: int
    median_s: float
    gb_per_s: float


def progress(what: str) -> None:
    print(f"[bench.transfer] {what}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], None], repeats: int) -> float:
    return median_seconds(fn, repeats)


def kv_layout(size: int) -> KVLayout:
    cfg = load_model(None).config
    probe = KVLayout(model=cfg.name, dtype="float32", block_size=16, num_layers=cfg.num_layers,
                     num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_blocks=1, element_size=4,
                     layout=POOL_LAYOUT)
    rows = size // (probe.block_bytes * cfg.num_layers)
    return KVLayout(**{**asdict(probe), "num_blocks": rows})


def payloads(size: int, layout: KVLayout, rng: np.random.Generator) -> dict[str, Ranges]:
    chunk = 4 << 20
    offsets = np.arange(0, size - chunk + 1, chunk)
    out = {"4MiB": Ranges(offsets, offsets, np.full(len(offsets), chunk))}
    usable = layout.num_blocks - 1  # the scratch block is never transferred
    n_req = usable // BLOCKS_PER_REQUEST
    local_runs = rng.permutation(n_req) * BLOCKS_PER_REQUEST
    remote_runs = rng.permutation(n_req) * BLOCKS_PER_REQUEST
    local = (local_runs[:, None] + np.arange(BLOCKS_PER_REQUEST)).reshape(-1)
    remote = (remote_runs[:, None] + np.arange(BLOCKS_PER_REQUEST)).reshape(-1)
    layers = list(range(layout.num_layers))
    out["kv-coalesced"] = block_ranges(layout, layout, layers, local.tolist(), remote.tolist())
    scattered = rng.permutation(usable)[:len(local)], rng.permutation(usable)[:len(local)]
    out["kv-scattered"] = block_ranges(layout, layout, layers, scattered[0].tolist(), scattered[1].tolist())
    return out


def shm_copy_seconds(endpoint: dict, local: torch.Tensor, repeats: int) -> float:
    _mapping, peer_memory = map_peer_buffer(endpoint, local.numel())
    return timed(lambda: peer_memory.copy_(local), repeats)


def raw_socket_seconds(port: int, data: torch.Tensor, repeats: int, context: ssl.SSLContext | None = None,
                       cipher: list[str] | None = None) -> float:
    """`cipher` receives the TLS cipher suite negotiated, with `context`."""
    plain = socket.create_connection(("127.0.0.1", port))
    tune_socket(plain)
    sock = plain if context is None else context.wrap_socket(plain, server_hostname="127.0.0.1")
    with sock:
        if isinstance(sock, ssl.SSLSocket) and cipher is not None:
            cipher.append(f"{sock.version()} {sock.cipher()[0]}")  # type: ignore[index]
        view = data.numpy().data.cast("B")

        def once() -> None:
            sock.sendall(struct.pack("!Q", len(view)))
            sock.sendall(view)
            assert sock.recv(1) == b"k"

        return timed(once, repeats)


@asynccontextmanager
async def initiator_and_peer(size: int, secret: str | None = None, integrity: str = "all",
                             pki_dir: str | None = None) -> AsyncIterator[tuple[TransferEngine, dict]]:
    """A local etcd, the segment owner (bench/transfer_peer.py: segment `bench-target` of `size` bytes) in its
    own process, and this process's engine (`bench-initiator`, nothing registered yet), with the link secret
    `secret` (`integrity`: what it seals) or mutual TLS from `pki_dir`; yields the engine and the peer's ready
    line, and stops both after."""
    prefix = f"/tandem/bench-{uuid.uuid4().hex[:8]}"
    with running_etcd() as etcd:
        tls_args = ["--tls-dir", pki_dir] if pki_dir is not None else []
        peer = spawn([sys.executable, "-m", "bench.transfer_peer", "--etcd", etcd, "--prefix", prefix,
                      "--size", str(size), "--integrity", integrity, *tls_args], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True,
                     env=child_environment({"TANDEM_KV_SECRET": secret} if secret else None))
        try:
            assert peer.stdout is not None
            ready = json.loads(peer.stdout.readline())
            progress(f"peer ready: {ready}")
            store = EtcdStore(etcd)
            engine = TransferEngine(store, TransferEngineConfig(
                engine_id="bench-initiator", metadata_prefix=prefix, link_secret=secret.encode() if secret else None,
                seal_payloads=integrity == "all", link_tls=link_tls(pki_dir)))
            try:
                yield engine, ready
            finally:
                progress("closing")
                await engine.close()
                await store.close()
                progress("closed")
        finally:
            assert peer.stdin is not None
            peer.stdin.close()
            peer.wait(timeout=30)


async def open_segments(engine: TransferEngine, size: int) -> tuple[torch.Tensor, RemoteSegment]:
    """Registers `bench-initiator` (`size` random bytes) and opens the peer's `bench-target`."""
    local = engine.allocate_host_buffer(size, "bench")
    local.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
    await engine.register_segment("bench-initiator", local)
    return local, await engine.open_segment("bench-target")


def pusher_groups(layout: KVLayout, blocks: int) -> list[list[int]]:
    """The layers of one push of `blocks` blocks, in the WRITE batches the prefill worker's KVPusher sends
    them in (finished layers grouped to >= its default 4 MiB)."""
    groups: list[list[int]] = [[]]
    for layer in range(layout.num_layers):
        groups[-1].append(layer)
        pending = len(groups[-1]) * blocks * layout.block_bytes
        if should_flush(layer, layout.num_layers, pending, DEFAULT_MIN_BATCH_BYTES) and layer + 1 < layout.num_layers:
            groups.append([])
    return groups


def push_seconds(engine: TransferEngine, layout: KVLayout, blocks: list[int], backend: str,
                 repeats: int) -> tuple[int, int, float]:
    """(bytes, batches, median seconds) of pushing `blocks` (the same ids on both sides) of every layer from
    `bench-initiator` to `bench-target` as the prefill worker does: all its WRITE batches submitted, then
    all waited."""
    per_layer = [block_ranges(layout, layout, group, blocks, blocks) for group in pusher_groups(layout, len(blocks))]

    def push() -> None:
        handles = [engine.submit_ranges(TransferOp.WRITE, "bench-initiator", "bench-target", r,
                                        backend=backend, timeout_s=30) for r in per_layer]  # type: ignore[arg-type]
        for handle in handles:
            handle.wait()
            handle.release()
    return sum(r.total_bytes for r in per_layer), len(per_layer), timed(push, repeats)


async def run(args: argparse.Namespace) -> dict:
    size = args.size_mib << 20
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="tandem-bench-pki-") as pki_dir:
        secret = secrets.token_hex(32) if args.authenticated else None
        if args.tls:
            make_pki(Path(pki_dir), "cluster")
        async with initiator_and_peer(size, secret, args.integrity, pki_dir if args.tls else None) as (engine, ready):
            return await measure(args, engine, ready, size, rng)


async def measure(args: argparse.Namespace, engine: TransferEngine, ready: dict, size: int,
                  rng: np.random.Generator) -> dict:
    local, remote = await open_segments(engine, size)
    rows: list[Row] = []

    whole = f"{size >> 20}MiB"
    t = shm_copy_seconds(dict(remote.descriptor.endpoints["shm"]), local, args.repeats)
    rows.append(Row("ceiling: torch copy, two processes' memfd buffers", whole, size, 1, t, size / t / 1e9))
    t = raw_socket_seconds(ready["raw_port"], local, args.repeats)
    rows.append(Row("ceiling: raw loopback socket sendall/recv_into", whole, size, 1, t, size / t / 1e9))
    tls, cipher = engine.config.link_tls, list[str]()
    if tls is not None:
        t = raw_socket_seconds(ready["tls_port"], local, args.repeats, tls.client_context, cipher)
        rows.append(Row("ceiling: the raw socket in TLS 1.3", whole, size, 1, t, size / t / 1e9))

    layout = kv_layout(size)
    cases = payloads(size, layout, rng)
    backends = [b for b in args.backends if b in remote.backends]
    for backend in backends:
        for payload, ranges in cases.items():
            def once(ranges: Ranges = ranges, backend: str = backend) -> None:
                with engine.submit_ranges(TransferOp.WRITE, "bench-initiator", "bench-target", ranges,
                                          backend=backend, timeout_s=120) as handle:  # type: ignore[arg-type]
                    handle.wait()
            progress(f"{backend} {payload}")
            t = timed(once, args.repeats)
            rows.append(Row(backend, payload, ranges.total_bytes, len(ranges), t, ranges.total_bytes / t / 1e9))

    prompt = []
    for backend in backends:
        nbytes, batches, t = push_seconds(engine, layout, list(range(BLOCKS_PER_REQUEST)), backend,
                                          max(args.repeats, 20))
        prompt.append({"backend": backend, "bytes": nbytes, "batches": batches, "median_ms": t * 1e3})
    return {"rows": [asdict(r) for r in rows], "prompt_512": prompt, "kv_block_bytes": layout.block_bytes,
            "num_layers": layout.num_layers, "tls_cipher": cipher[0] if cipher else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["shm", "tcp", "nixl"])
    parser.add_argument("--authenticated", action="store_true", help="links authenticated with a secret")
    parser.add_argument("--integrity", choices=("all", "frames"), default="all",
                        help="with --authenticated: seal every byte, or frames only (--kv-link-integrity)")
    parser.add_argument("--tls", action="store_true", help="links are mutual TLS (a throwaway PKI)")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    apply_ucx_defaults()
    result = asyncio.run(run(args))
    result["authenticated"] = args.authenticated
    result["integrity"] = args.integrity if args.authenticated else None
    result["tls"] = args.tls
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads":
                         torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    for r in result["rows"]:
        print(f"{r['name']:<52} {r['payload']:<13} {r['descriptors']:>6} desc  {r['gb_per_s']:6.2f} GB/s")
    for p in result["prompt_512"]:
        print(f"512-token prompt KV ({p['bytes'] / 2**20:.1f} MiB, {p['batches']} batches) via {p['backend']}: "
              f"{p['median_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
