"""A transfer-engine peer in its own OS process, driven by JSON lines on stdin/stdout.

Started by `KVPeer` (tests/support/kv_peers.py). It registers one segment of random bytes (seeded,
so the test can predict every byte) and answers commands:
  open {segment}                        → {"backends": [...]}
  submit {op, remote, ranges, tag, timeout, count}
                                        → {"ok": bool, "error": type, "message": str, "done": n}
  wait {tag, peer, timeout, count}      → {"notifications": [...], "error": type|None, "message": str}
  dump {path}                           → writes the segment's bytes to path
  grant {peer, tag, ranges}             → {"grant": id}: `peer` may write those (offset, length) rows
  revoke {grant}
  refused                               → links refused and batches refused for want of a grant, by reason
Each reply is one JSON line; "error" names the exception class for the test to assert on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from collections.abc import Iterator

import numpy as np
import torch

from kv_transfer import EtcdStore, NotifySpec, Ranges, TransferEngine, TransferEngineConfig, TransferError, TransferOp
from kv_transfer.grants import GRANT_REFUSED, GrantKey
from kv_transfer.link_auth import LINK_REFUSED
from tests.support.jsonl import command_loop, reply


def link_secret() -> bytes | None:
    """The KV link secret, as a worker gets it: a variable, not a flag."""
    secret = os.environ.get("TANDEM_KV_SECRET")
    return secret.encode() if secret else None


def initial_bytes(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def refusals() -> dict:
    """Links this process refused, and batches it refused for want of a grant, by reason."""
    links = {r: LINK_REFUSED.labels(r)._value.get() for r in ("no_proof", "bad_proof", "bad_tag")}
    batches = {r: GRANT_REFUSED.labels(r)._value.get() for r in ("no_grant", "outside_grant")}
    return {"ok": True, "refused": links, "grants_refused": batches}


async def serve(args: argparse.Namespace) -> None:
    store = EtcdStore(args.etcd)
    engine = TransferEngine(store, TransferEngineConfig(engine_id=args.name, backends=tuple(args.backends),
                                                        metadata_prefix=args.prefix, link_secret=link_secret()))
    buffer = engine.allocate_host_buffer(args.size, args.name)
    buffer.copy_(torch.from_numpy(initial_bytes(args.seed, args.size)))
    await engine.register_segment(args.name, buffer, guarded=args.guarded)
    reply({"ready": engine.engine_id})
    grants: dict[int, list[GrantKey]] = {}
    ids = itertools.count()
    await command_loop(lambda cmd: handle(engine, args.name, buffer, grants, ids, cmd), (TransferError,))
    await engine.close()
    await store.close()


async def handle(engine: TransferEngine, name: str, buffer: torch.Tensor, grants: dict[int, list[GrantKey]],
                 ids: Iterator[int], cmd: dict) -> dict:
    kind = cmd["cmd"]
    if kind == "open":
        remote = await engine.open_segment(cmd["segment"])
        return {"ok": True, "backends": list(remote.backends)}
    if kind == "submit":
        rows = np.asarray(cmd["ranges"], dtype=np.int64).reshape(-1, 3)
        ranges = Ranges(rows[:, 0], rows[:, 1], rows[:, 2])
        done = 0
        try:
            for _ in range(cmd.get("count", 1)):
                handle = engine.submit_ranges(TransferOp(cmd["op"]), name, cmd["remote"], ranges,
                                              notify=NotifySpec(cmd.get("tag", ""), cmd.get("message", "").encode()),
                                              timeout_s=cmd.get("timeout", 30.0))
                with handle:
                    await handle.wait_async()
                done += 1
        except TransferError as e:
            return {"ok": False, "error": type(e).__name__, "message": str(e), "done": done}
        return {"ok": True, "done": done}
    if kind == "wait":
        got = []
        with engine.subscribe(cmd["tag"], cmd.get("peer")) as sub:
            try:
                for _ in range(cmd.get("count", 1)):
                    n = await sub.get_async(cmd["timeout"])
                    got.append({"peer": n.peer, "ok": n.ok, "message": n.message.decode(), "error": n.error})
            except TransferError as e:
                return {"ok": False, "notifications": got, "error": type(e).__name__, "message": str(e)}
        return {"ok": True, "notifications": got}
    if kind == "dump":
        buffer.numpy().tofile(cmd["path"])
        return {"ok": True}
    if kind == "grant":
        rows = np.asarray(cmd["ranges"], dtype=np.int64).reshape(-1, 2)
        grant_id = next(ids)
        grants[grant_id] = engine.grant(name, cmd["peer"], cmd["tag"], rows[:, 0], rows[:, 1])
        return {"ok": True, "grant": grant_id}
    if kind == "revoke":
        engine.revoke(grants.pop(cmd["grant"], []))
        return {"ok": True}
    if kind == "refused":
        return refusals()
    raise ValueError(f"unknown command {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--prefix", default="/tandem/test")
    parser.add_argument("--backends", nargs="+", required=True)
    parser.add_argument("--guarded", action="store_true")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("UCX_MODULES", "^ib")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
