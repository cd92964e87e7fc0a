"""The cluster KV store with real processes: `tandem up --kv-store 1` (two prefill workers, one decode worker,
one store; TCP transfers, so every store read and write passes the store's grants), then a store started by
hand beside it. A prefix computed on one prefill worker is read from the store by the other, which computes
only the new tokens; a stopped-then-killed store, a corrupted block and a restarted empty store all leave
outputs exact (greedy, against transformers in fp32); reservations of a writer that never commits lapse."""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from bench.scrape import router_metrics
from common.etcd.lease import etcd_client
from common.kv_store_record import kv_stores_prefix
from common.processes import spawn, stop
from engine.block_manager import hash_blocks
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc
from tests.support.cluster import REPO, Cluster, assert_pools_clean, metric, tandem_up, worker_metrics
from tests.support.hf_reference import hf_greedy

BLOCK = 16
NEW_TOKENS = 4
SECRET = "kv-store-test-" + "0" * 32


async def _generate(cluster: Cluster, ids: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        return [t async for c in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
                for t in c.token_ids]


async def _stats(address: str) -> kvstore_pb2.StoreStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return await kvstore_pb2_grpc.KVStoreStub(channel).Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)


async def _readable(stores: list[str]) -> int:
    """Blocks readable in all of `stores` together, each store's integrity checked."""
    total = 0
    for address in stores:
        stats = await _stats(address)
        assert not stats.integrity_error, stats.integrity_error
        total += stats.readable_blocks
    return total


async def _until_stores_hold(stores: list[str], blocks: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (held := await _readable(stores)) < blocks:
        assert time.monotonic() < deadline, f"the stores hold {held} blocks, not {blocks}"
        await asyncio.sleep(0.1)


async def _until_router(cluster: Cluster, name: str, ok: Callable[[float], bool], **labels: str) -> None:
    for _ in range(200):
        if ok(value := metric(router_metrics(cluster), name, **labels)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}{labels} stayed at {value}")


def _counters(cluster: Cluster, worker_id: str) -> dict[str, float]:
    worker = next(w for w in cluster.workers if w.worker_id == worker_id)
    text = worker_metrics(worker)
    return {"computed": metric(text, "tandem_prefill_tokens_total", kind="computed"),
            "cached": metric(text, "tandem_prefill_tokens_total", kind="cached"),
            **{f"get_{o}": metric(text, "tandem_kv_store_blocks_total", op="get", outcome=o)
               for o in ("hit", "miss", "corrupt", "failed")}}


def _routed(cluster: Cluster, pool: str = "prefill") -> dict[str, float]:
    text = router_metrics(cluster)
    return {w.worker_id: metric(text, "tandem_router_routed_total", pool=pool, worker=w.worker_id)
            for w in cluster.role(pool)}


class Scenario:
    """Prompt A's prefix goes to one worker of `pool` that prefills (the writer); a prompt sharing 9 of its blocks
    plus 40 new tokens goes to the other (the reader: round-robin routing alternates)."""

    def __init__(self, cluster: Cluster, model: str, seed: int, pool: str = "prefill") -> None:
        self.cluster, self.model, self.rng, self.pool = cluster, model, random.Random(seed), pool

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(4, 512) for _ in range(n)]

    async def write(self, stores: list[str]) -> tuple[list[int], str]:
        prefix = self.tokens(10 * BLOCK)
        before = _routed(self.cluster, self.pool)
        held = await _readable(stores)
        assert await _generate(self.cluster, prefix) == hf_greedy(self.model, prefix, NEW_TOKENS, ())
        after = _routed(self.cluster, self.pool)
        writer = next(w for w in after if after[w] > before[w])
        await _until_stores_hold(stores, held + 10)
        return prefix, writer

    async def read(self, prefix: list[int], writer: str) -> tuple[str, dict[str, float], float]:
        """(the reader, its counters' changes, seconds the request took)."""
        prompt = prefix[:9 * BLOCK] + self.tokens(40)
        reader = next(w.worker_id for w in self.cluster.role(self.pool) if w.worker_id != writer)
        before = _counters(self.cluster, reader)
        routed = _routed(self.cluster, self.pool)
        started = time.monotonic()
        assert await _generate(self.cluster, prompt) == hf_greedy(self.model, prompt, NEW_TOKENS, ())
        took = time.monotonic() - started
        assert _routed(self.cluster, self.pool)[reader] == routed[reader] + 1, "round-robin did not alternate"
        after = _counters(self.cluster, reader)
        return reader, {k: after[k] - before[k] for k in after}, took


@pytest.mark.slow
async def test_a_prefix_computed_on_one_prefill_worker_is_read_from_the_store_by_another(tiny_llama_dir) -> None:
    model = str(tiny_llama_dir)
    with tandem_up("--prefill", "2", "--decode", "1", "--kv-store", "2", "--model", model, "--dtype", "float32",
                   "--policy", "round_robin", "--kv-backends", "tcp", "--kv-offload-gib", "0.002",
                   env={"TANDEM_KV_SECRET": SECRET}) as cluster:
        stores = [s.address for s in cluster.kv_stores]
        scenario = Scenario(cluster, model, seed=3)

        # the blocks are sharded over both stores: a put and a get each span the two
        prefix, writer = await scenario.write(stores)
        held = [len(await _lookup(address, prefix)) for address in stores]
        assert sum(held) == 10, held
        reader, delta, _ = await scenario.read(prefix, writer)
        assert (delta["computed"], delta["cached"], delta["get_hit"]) == (40, 9 * BLOCK, 9), delta
        for store in cluster.kv_stores:
            await _until_router(cluster, "tandem_router_kv_store_blocks", lambda n: n >= 1, store=store.store_id)

        # blocks corrupted in the stores' memory are caught by their checksum and computed, never used; the
        # reader has the stores check them over their own bytes, and they drop them
        prefix, writer = await scenario.write(stores)
        for store in cluster.kv_stores:
            _corrupt(store.pid, [h.offset for h in await _lookup(store.address, prefix)])
        _, delta, _ = await scenario.read(prefix, writer)
        assert delta["get_corrupt"] >= 1 and delta["computed"] == 9 * BLOCK + 40, delta
        for _ in range(100):
            if not any([await _lookup(address, prefix[:9 * BLOCK]) for address in stores]):
                break
            await asyncio.sleep(0.1)
        stats = [await _stats(address) for address in stores]
        assert sum(s.dropped for s in stats) == 9 and all(s.committed for s in stats), stats
        # by now the reader has measured its prefill too (its first one is a warm-up): the router has its price
        # of a block read from the store (kv_aware routing)
        await _until_router(cluster, "tandem_router_worker_block_cost", lambda c: c > 0, worker=reader, tier="store")

        # stopped mid-get, then killed: the request waits at most the store timeout (1 s), then computes
        prefix, writer = await scenario.write(stores)
        for store in cluster.kv_stores:
            os.kill(store.pid, signal.SIGSTOP)
        read = asyncio.ensure_future(scenario.read(prefix, writer))
        await asyncio.sleep(0.5)
        for store in cluster.kv_stores:
            os.kill(store.pid, signal.SIGKILL)
        _, delta, took = await read
        assert delta["computed"] == 9 * BLOCK + 40 and delta["get_failed"] >= 9, delta
        assert took < 3, took

        # an empty store started in their place is found and filled, and read from
        with _store_process(SECRET, cluster.etcd, reserve_ttl_s=1.0) as (replacement, _):
            await _until_stores(cluster, {replacement})
            prefix, writer = await scenario.write([replacement])
            _, delta, _ = await scenario.read(prefix, writer)
            assert (delta["computed"], delta["get_hit"]) == (40, 9), delta

            # a writer that reserves and never commits (killed) leaks nothing: its reservation lapses
            async with grpc.aio.insecure_channel(replacement) as channel:
                stub = kvstore_pb2_grpc.KVStoreStub(channel)
                stats = await stub.Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)
                await stub.Reserve(kvstore_pb2.StoreReserveRequest(
                    namespace=stats.namespace, engine_id="gone", block_bytes=stats.block_bytes,
                    blocks=[kvstore_pb2.StoreBlock(hash=h, token_ids=[1]) for h in (11, 12, 13)]), timeout=10)
                # >= : a worker's own put of the last read's blocks may still hold its reservation here
                assert (await stub.Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)).reserved_blocks >= 3
                await asyncio.sleep(2.0)
                after = await stub.Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)
                assert (after.reserved_blocks, after.lapsed) == (0, 3) and not after.integrity_error, after
        await assert_pools_clean(cluster)


@pytest.mark.slow
async def test_decode_workers_that_prefill_themselves_read_the_store_too(tiny_llama_dir) -> None:
    """No prefill pool: each decode worker prefills locally, reading first what the store holds of the prompt."""
    model = str(tiny_llama_dir)
    with tandem_up("--prefill", "0", "--decode", "2", "--kv-store", "1", "--model", model, "--dtype", "float32",
                   "--policy", "round_robin", "--kv-offload-gib", "0.002") as cluster:
        scenario = Scenario(cluster, model, seed=5, pool="decode")
        prefix, writer = await scenario.write([cluster.kv_stores[0].address])
        _, delta, _ = await scenario.read(prefix, writer)
        assert (delta["computed"], delta["cached"], delta["get_hit"]) == (40, 9 * BLOCK, 9), delta
        await _bad_calls_are_refused(cluster.kv_stores[0].address)
        await assert_pools_clean(cluster)


async def _bad_calls_are_refused(address: str) -> None:
    """Bad input gets INVALID_ARGUMENT, another model's blocks FAILED_PRECONDITION; the store serves on, intact."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        stats = await stub.Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)
        bad = [
            (stub.Lookup(kvstore_pb2.StoreLookupRequest(namespace=stats.namespace, engine_id="x",
                                                        hashes=list(range(5000))), timeout=10), "INVALID_ARGUMENT"),
            (stub.Lookup(kvstore_pb2.StoreLookupRequest(namespace=stats.namespace, hashes=[1]), timeout=10),
             "INVALID_ARGUMENT"),
            (stub.Reserve(kvstore_pb2.StoreReserveRequest(engine_id="x", block_bytes=stats.block_bytes,
                                                          blocks=[kvstore_pb2.StoreBlock(hash=1)]), timeout=10),
             "INVALID_ARGUMENT"),
            (stub.Reserve(kvstore_pb2.StoreReserveRequest(namespace="another-model", engine_id="x",
                                                          block_bytes=stats.block_bytes,
                                                          blocks=[kvstore_pb2.StoreBlock(hash=1)]), timeout=10),
             "FAILED_PRECONDITION"),
            (stub.Verify(kvstore_pb2.StoreVerifyRequest(namespace="another-model", hashes=[1]), timeout=10),
             "FAILED_PRECONDITION"),
        ]
        for call, code in bad:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code().name == code, refused.value
        after = await stub.Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)
        # nothing dropped (the workers' background puts may still commit blocks meanwhile)
        assert after.readable_blocks >= stats.readable_blocks and not after.integrity_error, after


async def _lookup(address: str, prefix: list[int]) -> list[kvstore_pb2.StoreHit]:
    """The store's hits for the prefix's blocks (any engine id: a lookup only grants reads)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        stats = await stub.Stats(kvstore_pb2.StoreStatsRequest(), timeout=10)
        reply = await stub.Lookup(kvstore_pb2.StoreLookupRequest(
            namespace=stats.namespace, engine_id="test", hashes=hash_blocks(prefix, BLOCK)), timeout=10)
    return list(reply.hits)


def _corrupt(store_pid: int, offsets: list[int]) -> None:
    """Flip a byte in the middle of each block at `offsets` in the store's memory (its memfd, mapped here)."""
    fd_dir = f"/proc/{store_pid}/fd"
    fd = next(n for n in os.listdir(fd_dir) if "tandem-kvstore" in os.readlink(f"{fd_dir}/{n}"))
    with open(f"{fd_dir}/{fd}", "r+b") as f, mmap.mmap(f.fileno(), 0) as memory:
        for offset in offsets:
            memory[offset + 100] ^= 0xFF


async def _until_stores(cluster: Cluster, addresses: set[str], timeout_s: float = 30.0) -> None:
    """Until etcd lists exactly the stores at `addresses` and every prefill worker uses exactly those."""
    client = etcd_client(cluster.etcd, 5.0)
    deadline = time.monotonic() + timeout_s
    while True:
        listed = await client.get_prefix(kv_stores_prefix("default").encode())
        records = {json.loads(kv.value)["address"]: json.loads(kv.value)["store_id"] for kv in listed}
        if set(records) == addresses:
            ids = set(records.values())
            used = [{store for store in ids
                     if metric(worker_metrics(w), "tandem_kv_store_known", store=store) == 1}
                    for w in cluster.role("prefill")]
            known = [sum(1 for line in worker_metrics(w).splitlines()
                         if line.startswith("tandem_kv_store_known{")) for w in cluster.role("prefill")]
            if all(u == ids for u in used) and all(k == len(ids) for k in known):
                return
        assert time.monotonic() < deadline, f"stores listed {records}, expected {addresses}"
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def _store_process(secret: str, etcd: str, **flags: object) -> Iterator[tuple[str, int]]:
    """A `tandem kvstore` of the cluster, (its address, its pid), stopped at the end."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    proc = spawn([sys.executable, "-m", "cluster.cli", "kvstore", "--etcd", etcd, "--kv-backends", "tcp", *args],
                 cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "TANDEM_KV_SECRET": secret})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["READY"], f"the store did not start: {line}"
        yield line[2], proc.pid
    finally:
        stop(proc, 10.0)
