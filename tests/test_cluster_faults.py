"""Issue 6's fault matrix on a local multi-process cluster (`tandem up`, real etcd, loopback):

- a prefill worker SIGKILLed mid-prefill: its requests complete through the other prefill worker
  or a local prefill, exactly as the engine alone would answer them;
- a prefill worker SIGSTOPped during its KV pushes: the decode worker hits --prefill-timeout-s and
  prefills itself (exact output); the frozen worker's lease lapses and the router drops it; after
  SIGCONT it registers again and takes remote prefills again; likewise a decode worker frozen while
  KV lands in it finishes its requests exactly once resumed, and registers again;
- etcd restarted (SIGTERM, at once) and crashed (SIGKILL) for 10 s: requests in flight and new ones
  are served throughout from the router's last view; once etcd is back the workers register again,
  a worker killed during the outage leaves the view and one started afterwards joins it;
- the router SIGKILLed and a new one started on the same ports: clients see UNAVAILABLE, retry,
  and get exact answers.

After every scenario every worker's block pool passes its integrity check, with nothing held.
(A SIGKILLed prefill worker *before* the request and a prefill worker frozen *before* the request
are in test_cluster_membership.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from bench.scrape import metric_sum, router_metrics
from common.etcd.local import EtcdServer, free_port
from common.processes import spawn, stop
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import (
    REPO,
    Cluster,
    WorkerInfo,
    assert_pools_clean,
    fetch,
    metric,
    tandem_up,
    worker_metrics,
)
from tests.support.cluster_workload import Expected, Job, gather_limited, reference, run_grpc, workload

TTL = 2  # lease of the worker records, seconds
KV_SECRET = "test-cluster-kv-secret-7f3a"  # what a worker started beside `tandem up` needs to join its KV links
SMALL = ("--dtype", "float32", "--num-kv-blocks", "512", "--min-remote-prefill-tokens", "4", "--lease-ttl-s", str(TTL))


def long_prompts(count: int, seed: int, max_tokens: int = 6) -> list[Job]:
    """Distinct prompts of 150-230 tokens (no shared prefix: every one is computed in full)."""
    rng = random.Random(seed)
    return [Job("ids", ids=tuple(rng.randrange(4, 512) for _ in range(rng.randint(150, 230))),
                max_tokens=max_tokens) for _ in range(count)]


def answers(model: object, sets: list[list[Job]], simulate: str | None = None) -> list[list[Expected]]:
    """The engine alone's answers to each set of jobs (one engine, one batch)."""
    flat = iter(reference(str(model), [job for jobs in sets for job in jobs], simulate=simulate))
    return [[next(flat) for _ in jobs] for jobs in sets]


async def until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(poll_s)


def workers_seen(cluster: Cluster | str) -> int:
    """How many workers the router lists (0 when it has no decode worker: /health is then 503)."""
    url = cluster if isinstance(cluster, str) else cluster.http_url
    try:
        return int(json.loads(fetch(f"{url}/health"))["workers"])
    except OSError:
        return 0


async def strike_when_busy(worker: WorkerInfo, sig: signal.Signals, at_least: int, burst: asyncio.Future,
                           gauge: str = "tandem_running_sequences", timeout_s: float = 60.0) -> int:
    """Send `sig` to `worker` as soon as its `gauge` reads `at_least`; returns the reading, or 0 if
    `burst` ended first (then nothing was sent). The gauges are read from the scheduler while a
    step runs: running sequences on a prefill worker are prompts being computed now, their KV
    partly pushed; remote-KV-waiting ones on a decode worker are prompts whose KV is landing."""
    deadline = time.monotonic() + timeout_s
    while not burst.done():
        assert time.monotonic() < deadline, f"{worker.worker_id} never got busy"
        reading = metric(await asyncio.to_thread(worker_metrics, worker), gauge)
        if reading >= at_least:
            os.kill(worker.pid, sig)
            return int(reading)
    return 0


def run_all(address: str, jobs: list[Job]) -> asyncio.Future:
    return asyncio.ensure_future(gather_limited([run_grpc(address, job) for job in jobs]))


def decode_metric(cluster: Cluster, name: str, **labels: str) -> float:
    return sum(metric_sum(worker_metrics(d), name, **labels) for d in cluster.role("decode"))


# -- 1. a prefill worker SIGKILLed mid-prefill ----------------------------------------------------------

@pytest.mark.slow
async def test_prefill_worker_killed_mid_prefill(tiny_llama_engines) -> None:
    engines = tiny_llama_engines
    bursts = [long_prompts(24, seed=100 + i) for i in range(3)] + [long_prompts(8, seed=199)]
    expected = answers(engines.checkpoint, bursts, None if engines.profile is None else str(engines.profile))
    with tandem_up("--prefill", "2", "--decode", "1", *engines.args, *SMALL) as cluster:
        victim = cluster.role("prefill")[0]
        held = 0
        for jobs, want in zip(bursts[:-1], expected[:-1], strict=True):  # a burst may end before the kill
            burst = run_all(cluster.grpc_address, jobs)
            held = await strike_when_busy(victim, signal.SIGKILL, 2, burst)
            assert await burst == want  # exact, whether the other prefill worker or the decode worker took over
            if held:
                break
        assert held >= 2, "the prefill worker was never caught computing prompts"
        cluster.workers.remove(victim)
        # each prompt the victim was computing failed there mid-call, and was prefilled again elsewhere
        assert decode_metric(cluster, "tandem_remote_prefill_failures_total", error="unavailable") >= held
        # new prompts after the kill (the victim stays listed until its lease lapses): still exact
        assert await run_all(cluster.grpc_address, bursts[-1]) == expected[-1]
        await assert_pools_clean(cluster)


# -- 2. workers SIGSTOPped during a KV transfer, then resumed ---------------------------------------------

def decisions(decode: WorkerInfo, decision: str) -> float:
    return metric(worker_metrics(decode), "tandem_disaggregation_decisions_total", decision=decision)


@pytest.mark.slow
async def test_workers_frozen_mid_transfer_are_bypassed_then_rejoin(tiny_llama_dir) -> None:
    sets = [workload(count=4, seed=202)[:1], long_prompts(16, seed=200), long_prompts(8, seed=201),
            long_prompts(16, seed=203), long_prompts(4, seed=204)]
    want = answers(tiny_llama_dir, sets)
    warm, prefill_frozen, after, decode_frozen, last = sets
    with tandem_up("--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), *SMALL,
                   "--prefill-timeout-s", "2") as cluster:
        prefill, decode = cluster.role("prefill")[0], cluster.role("decode")[0]
        assert await run_all(cluster.grpc_address, warm) == want[0]  # the transfer link is up

        # the prefill worker frozen while computing prompts and pushing their KV: the decode worker
        # waits --prefill-timeout-s, then prefills them itself; the blocks stay held meanwhile
        burst = run_all(cluster.grpc_address, prefill_frozen)
        held = await strike_when_busy(prefill, signal.SIGSTOP, 1, burst)
        frozen_at = time.monotonic()
        assert held >= 1, "the prefill worker finished the burst before it could be frozen"
        try:
            assert await burst == want[1]
            assert time.monotonic() - frozen_at >= 2
            assert decisions(decode, "fallback") >= 1
            # frozen past its lease: the router stops offering it, prompts prefill on the decode worker
            await until(lambda: workers_seen(cluster) == 1, TTL + 5, "the frozen worker left the router's view")
            local = decisions(decode, "local_no_prefill_worker")
            assert await run_all(cluster.grpc_address, after[:2]) == want[2][:2]
            assert decisions(decode, "local_no_prefill_worker") == local + 2
        finally:
            os.kill(prefill.pid, signal.SIGCONT)
        # back: it registers again under a new lease and takes remote prefills again
        await until(lambda: workers_seen(cluster) == 2, 15, "the resumed prefill worker rejoined")
        remote = decisions(decode, "remote")
        computed = metric(worker_metrics(prefill), "tandem_prefill_tokens_total", kind="computed")
        assert await run_all(cluster.grpc_address, after[2:]) == want[2][2:]
        assert decisions(decode, "remote") == remote + len(after[2:])
        assert metric(worker_metrics(prefill), "tandem_prefill_tokens_total", kind="computed") > computed
        await assert_pools_clean(cluster)

        # the decode worker frozen while prompts' KV lands in its blocks, past --prefill-timeout-s and
        # past its lease: once resumed it finishes every request exactly, registers again, serves again
        burst = run_all(cluster.grpc_address, decode_frozen)
        held = await strike_when_busy(decode, signal.SIGSTOP, 1, burst, gauge="tandem_remote_kv_waiting_sequences")
        frozen_at = time.monotonic()
        assert held >= 1, "the decode worker was never caught waiting for remote KV"
        try:
            await until(lambda: workers_seen(cluster) == 0, TTL + 5, "the frozen decode worker left the view")
            await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - frozen_at)))
        finally:
            os.kill(decode.pid, signal.SIGCONT)
        assert await burst == want[3]
        await until(lambda: workers_seen(cluster) == 2, 15, "the resumed decode worker rejoined")
        assert await run_all(cluster.grpc_address, last) == want[4]
        await assert_pools_clean(cluster)


# -- 3. etcd restarted, and etcd down for 10 s -----------------------------------------------------------

@dataclass
class Load:
    """Client loops sending requests and checking every answer against the engine alone's."""

    address: str
    jobs: list[Job]
    expected: list[Expected]
    retry_unavailable: bool = False  # retry a request the router could not be reached for
    done: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered) of each exact answer
    wrong: list[str] = field(default_factory=list)
    unavailable: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, first: int) -> None:
        i = first
        while not self._stop.is_set():
            job, want = self.jobs[i % len(self.jobs)], self.expected[i % len(self.jobs)]
            sent = time.monotonic()
            try:
                got = await run_grpc(self.address, job)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and self.retry_unavailable:
                    self.unavailable += 1
                    await asyncio.sleep(0.1)
                    continue  # the same request again
                self.wrong.append(f"request {i}: {e.code().name}: {e.details()}")
            else:
                if got == want:
                    self.done.append((sent, time.monotonic()))
                else:
                    self.wrong.append(f"request {i}: {got} != {want}")
            i += 1

    async def completed(self, more: int, timeout_s: float = 60.0) -> None:
        """Until `more` further requests ended well."""
        target = len(self.done) + more
        await until(lambda: len(self.done) >= target or bool(self.wrong), timeout_s, f"{more} more requests")
        assert not self.wrong, self.wrong

    def answered_between(self, start: float, end: float) -> int:
        return sum(start <= answered <= end for _, answered in self.done)

    def in_flight_at(self, moment: float) -> int:
        """Requests sent before `moment` and answered exactly after it."""
        return sum(sent < moment < answered for sent, answered in self.done)

    def stop(self) -> None:
        """The clients send nothing more (those in flight finish)."""
        self._stop.set()

    @contextlib.asynccontextmanager
    async def running(self, clients: int) -> AsyncIterator[Load]:
        tasks = [asyncio.ensure_future(self.client(c * 7)) for c in range(clients)]
        try:
            yield self
        finally:
            self.stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 150)
        assert not self.wrong, self.wrong


async def etcd_worker_leases(endpoint: str) -> dict[str, int]:
    """worker id → the lease its record is under, read from etcd."""
    from common.etcd.lease import etcd_client

    client = etcd_client(endpoint, 5.0)
    try:
        listed = await client.get_prefix(b"/tandem/default/workers/")
        return {kv.key.decode().rsplit("/", 1)[1]: kv.lease for kv in listed}
    finally:
        await client.close()


@contextlib.contextmanager
def started_worker(etcd: str, model: str, role: str, worker_id: str) -> Iterator[subprocess.Popen]:
    """A worker joining a cluster that `tandem_up` started with KV_SECRET (its KV links need it)."""
    proc = spawn([sys.executable, "-m", "cluster.cli", "worker", "--role", role, "--etcd", etcd, "--model", model,
                  "--worker-id", worker_id, *SMALL], cwd=REPO, stdout=subprocess.PIPE, text=True,
                 env={**os.environ, "TANDEM_KV_SECRET": KV_SECRET})
    try:
        yield proc
    finally:
        rc = stop(proc, 60)
        assert proc.stdout is not None
        proc.stdout.close()
        assert rc == 0, f"worker {worker_id} exited with {rc}"


async def worker_ready(proc: subprocess.Popen, role: str, timeout_s: float = 180.0) -> WorkerInfo:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
    ready, worker_id, address, metrics_port = line.split()
    assert ready == "READY", line
    return WorkerInfo(worker_id, role, address, proc.pid, int(metrics_port))


@pytest.mark.slow
async def test_etcd_restart_and_outage(tiny_llama_dir, tmp_path) -> None:
    jobs = [j for j in workload(count=24, seed=300) if j.kind == "ids"] + long_prompts(4, seed=301, max_tokens=24)
    expected = reference(str(tiny_llama_dir), jobs)
    etcd = EtcdServer(str(tmp_path))
    etcd.start()
    try:
        with tandem_up("--etcd", etcd.endpoint, "--prefill", "2", "--decode", "1", "--model", str(tiny_llama_dir),
                       *SMALL, "--policy", "round_robin", env={"TANDEM_KV_SECRET": KV_SECRET}) as cluster:
            load = Load(cluster.grpc_address, jobs, expected)
            async with load.running(clients=3):
                await load.completed(6)
                # a clean restart, at once: the leases survive it (etcd keeps them, with their TTL renewed),
                # and the workers' keep-alives reach the new process, so no record lapses
                before = await etcd_worker_leases(etcd.endpoint)
                assert sorted(before) == sorted(w.worker_id for w in cluster.workers)
                etcd.stop(signal.SIGTERM)
                restarted_at = time.monotonic()
                etcd.start()
                await asyncio.sleep(2 * TTL + 0.5)
                assert (await etcd_worker_leases(etcd.endpoint)).keys() == before.keys()
                await load.completed(6)
                assert load.in_flight_at(restarted_at) >= 1  # and they were answered exactly
                assert workers_seen(cluster) == 3

                # a crash and 10 s without etcd; a prefill worker dies meanwhile
                victim = cluster.role("prefill")[1]
                etcd.stop(signal.SIGKILL)
                down_at = time.monotonic()
                await asyncio.sleep(2)
                os.kill(victim.pid, signal.SIGKILL)
                cluster.workers.remove(victim)
                await asyncio.sleep(10 - (time.monotonic() - down_at))
                assert workers_seen(cluster) == 3  # the router kept its last view
                served_while_down = load.answered_between(down_at, time.monotonic())
                etcd.start()
                back_at = time.monotonic()
                assert served_while_down >= 3, f"only {served_while_down} requests were served while etcd was down"
                assert load.in_flight_at(down_at) >= 1

                # the router re-syncs: the dead worker leaves, and a worker started now joins; the others
                # registered again under new leases (theirs could not be kept alive through the outage)
                await until(lambda: workers_seen(cluster) == 2, TTL + 5, "the dead worker left the view")
                assert time.monotonic() - back_at <= TTL + 5
                after = await etcd_worker_leases(etcd.endpoint)
                assert sorted(after) == sorted(w.worker_id for w in cluster.workers)
                assert all(after[w] != before[w] for w in after)
                with started_worker(etcd.endpoint, str(tiny_llama_dir), "decode", "late-decode") as proc:
                    late = await worker_ready(proc, "decode")
                    cluster.workers.append(late)
                    await until(lambda: workers_seen(cluster) == 3, 10, "the new worker joined the view")
                    routed = metric(router_metrics(cluster), "tandem_router_routed_total", pool="prefill",
                                    worker=victim.worker_id)
                    await load.completed(8)
                    text = router_metrics(cluster)
                    assert metric(text, "tandem_router_routed_total", pool="decode", worker=late.worker_id) > 0
                    assert metric(text, "tandem_router_routed_total", pool="prefill",
                                  worker=victim.worker_id) == routed
                    # the new decode worker prefills remotely (its KV segment found through the restarted etcd)
                    await until(lambda: metric(worker_metrics(late), "tandem_disaggregation_decisions_total",
                                               decision="remote") > 0, 30, "the new worker prefilled remotely")
                    load.stop()
                    await assert_pools_clean(cluster)
                    cluster.workers.remove(late)
    finally:
        etcd.stop()


# -- 4. the router restarted --------------------------------------------------------------------------------

@contextlib.contextmanager
def router_process(etcd: str, model: str, grpc_port: int, http_port: int) -> Iterator[subprocess.Popen]:
    proc = spawn([sys.executable, "-m", "cluster.cli", "router", "--etcd", etcd, "--model", model,
                  "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
                 cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        stop(proc, 30)
        assert proc.stdout is not None
        proc.stdout.close()


async def router_ready(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
    assert line.startswith("READY router"), line


@pytest.mark.slow
async def test_router_restart_clients_retry(tiny_llama_dir) -> None:
    jobs = [j for j in workload(count=16, seed=400) if j.kind == "ids"] + long_prompts(4, seed=401, max_tokens=24)
    expected = reference(str(tiny_llama_dir), jobs)
    with tandem_up("--prefill", "1", "--decode", "1", "--model", str(tiny_llama_dir), *SMALL) as cluster:
        grpc_port, http_port = free_port(), free_port()
        address, url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        load = Load(address, jobs, expected, retry_unavailable=True)
        with router_process(cluster.etcd, str(tiny_llama_dir), grpc_port, http_port) as first:
            await router_ready(first)
            async with load.running(clients=3):
                await load.completed(6)
                async with grpc.aio.insecure_channel(address) as channel:  # a stream of 200 tokens, mid-way
                    call = inference_pb2_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
                        token_ids=pb.TokenIds(ids=range(10, 20)), sampling=pb.SamplingParameters(
                            temperature=0.0, max_tokens=200, ignore_eos=True)), timeout=60)
                    assert (await call.read()).token_ids
                    first.kill()  # the requests in flight fail UNAVAILABLE (the load's clients send them again)
                    await asyncio.to_thread(first.wait, 30)
                    with pytest.raises(grpc.aio.AioRpcError) as broken:
                        while await call.read() != grpc.aio.EOF:
                            pass
                    assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
                await until(lambda: load.unavailable >= 3, 30, "clients saw the router gone")
                crashed = len(load.done)
                with router_process(cluster.etcd, str(tiny_llama_dir), grpc_port, http_port) as second:
                    await router_ready(second)  # the same ports
                    assert workers_seen(url) == 2
                    await load.completed(9)
                    assert len(load.done) > crashed
                    load.stop()
        assert load.unavailable >= 3
        await assert_pools_clean(cluster)  # the dead router's streams were cancelled on the workers
