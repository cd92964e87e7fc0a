"""An engine with a KV connector in its own OS process, driven by JSON lines on stdin/stdout.

Commands (one JSON reply line each; "error" names the exception class on failure):
  connect {segment}                                   → handshake with a peer engine's KV segment
  reserve {request_id, prompt, max_tokens}            → decode role: {"blocks": [...]} (-1: not needed)
  prefill {request_id, prompt, peer_segment, blocks}  → prefill role: push KV, {"first_token": t, "bytes": n}
  decode {request_id, peer, timeout}                  → decode role: grant the blocks to `peer` and say
                                                        {"expecting": id}; wait for the KV, decode,
                                                        {"tokens": [...], "layers": [...]}
  refused                                             → links and batches refused, by reason, and
                                                        the grants live
With TANDEM_KV_SECRET set, its links are authenticated and sealed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_runner import ModelRunner
from engine.remote_kv import RemotePrefillResult
from kv_transfer import EtcdStore, TransferEngine, TransferEngineConfig, TransferError
from kv_transfer.kv_connector import KVConnector
from kv_transfer.kv_push import KVPusher
from tests.support.jsonl import command_loop, reply
from tests.support.kv_peer import link_secret, refusals

RESERVED: dict[str, list[int]] = {}  # request id -> the blocks `reserve` returned (the decode side's wants)
EVENT_WAITS: list[str] = []  # the thread of each SlowEvent waited on


class SlowEvent:
    """A layer's writes "queued on a device" (engine.kv_hooks.LayerReady): they take 2 ms to land."""

    def __init__(self) -> None:
        self._landed_at = time.monotonic() + 0.002

    def synchronize(self) -> None:
        EVENT_WAITS.append(threading.current_thread().name)
        time.sleep(max(0.0, self._landed_at - time.monotonic()))


async def serve(args: argparse.Namespace) -> None:
    store = EtcdStore(args.etcd)
    transfer = TransferEngine(store, TransferEngineConfig(engine_id=args.name, backends=(args.backend,),
                                                          metadata_prefix=args.prefix, link_secret=link_secret()))
    # fp32: its outputs are compared with transformers fp32 (bf16 flips near-ties)
    config = EngineConfig(model=args.model, num_kv_blocks=args.num_blocks, block_size=args.block_size,
                          max_num_batched_tokens=args.max_batched_tokens, max_model_len=1024, dtype="float32",
                          quantization=args.quantization, device=args.device)
    # on a GPU the pool is device memory, registered as a CUDA segment; on CPU, the transfer engine's host buffer
    engine = LLMEngine(config, kv_storage=None if args.device == "cuda"
                       else lambda n: transfer.allocate_host_buffer(n, "kv"))
    connector = KVConnector(transfer, engine.parts.pool, engine.model_config, args.name,
                            weights=engine.parts.weights_fingerprint, groups=engine.parts.kv_groups)
    await connector.publish()
    pusher = KVPusher(connector, config.block_size)
    engine.set_kv_hook(pusher)
    if args.layer_events:  # as on a GPU: the push waits on each layer's event, off the engine's thread
        assert isinstance(engine.runner, ModelRunner)
        engine.runner.layer_events = SlowEvent
    reply({"ready": transfer.engine_id})
    await command_loop(lambda cmd: handle(engine, connector, pusher, cmd), (TransferError, ValueError))
    await transfer.close()
    await store.close()


async def handle(engine: LLMEngine, connector: KVConnector, pusher: KVPusher, cmd: dict) -> dict:
    kind = cmd["cmd"]
    if kind == "connect":
        await connector.connect(cmd["segment"])
        return {"ok": True}
    if kind == "check_peer":  # the decode side's check of a pusher, without opening its segment
        await connector.check_peer(cmd["segment"])
        return {"ok": True}
    if kind == "reserve":
        params = SamplingParams(max_tokens=cmd["max_tokens"], temperature=0.0)
        request = engine.make_request(cmd["request_id"], cmd["prompt"], params)
        RESERVED[cmd["request_id"]] = engine.remote_kv.reserve(request)
        return {"ok": True, "blocks": RESERVED[cmd["request_id"]]}
    if kind == "prefill":
        bytes_before = pusher.bytes_submitted
        peer = await connector.connect(cmd["peer_segment"])
        pusher.expect(cmd["request_id"], peer, cmd["blocks"])
        engine.add_request(engine.make_request(cmd["request_id"], cmd["prompt"],
                                               SamplingParams(max_tokens=1, temperature=0.0)))
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == cmd["request_id"] and out.token_ids:
                    first = out.token_ids[0]
        engine.check_integrity()
        waits, threads = len(EVENT_WAITS), sorted(set(EVENT_WAITS))
        EVENT_WAITS.clear()
        return {"ok": True, "first_token": first, "bytes": pusher.bytes_submitted - bytes_before,
                "event_waits": waits, "event_threads": threads}
    if kind == "decode":
        rid = cmd["request_id"]
        receipt = connector.expect(rid, cmd["peer"], RESERVED.pop(rid))
        reply({"ok": True, "expecting": rid})  # the blocks are granted: the push may start
        try:
            first = await receipt.wait(cmd["timeout"])
        except TransferError as e:
            engine.abort_request(rid)
            engine.check_integrity()
            return {"ok": False, "error": type(e).__name__, "message": str(e),
                    "layers": receipt.completed_layers()}
        tokens = engine.remote_kv.resume(rid, RemotePrefillResult(first)).token_ids
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    tokens = out.token_ids
        engine.check_integrity()
        return {"ok": True, "tokens": tokens, "layers": receipt.completed_layers()}
    if kind == "refused":
        return {**refusals(), "grants": len(connector.transfer.grants)}
    raise ValueError(f"unknown command {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--etcd", "--name", "--backend", "--model"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--prefix", default="/tandem/test")
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--quantization", choices=("int8", "int4"), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layer-events", type=int, default=0,
                        help="1: mark each layer's KV writes as a device would (a slow event to wait on)")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("UCX_MODULES", "^ib")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
