"""The Ray scenario of tests/test_ray_cluster.py, run inside a loopback-only namespace (Ray binds the
machine's routed address otherwise). It starts a two-node Ray cluster (node "P" with the custom
resources prefill and router, node "D" with decode: 2; both on 127.0.0.1, so "the driver's node" is
ambiguous here and the router goes by its resource), then

  A. `tandem up --ray --planner true` (1 prefill + 2 decode workers, the planner's bounds holding
     those sizes): where each actor landed, the workload's
     outputs, and under continuous load: a decode actor's process SIGKILLed (Ray restarts it in
     place) and the prefill actor killed for good (`ray.kill`, the driver replaces it);
  B. ActorFleet as the planner's actuator, driven here: decode grown 1 → 2, then shrunk back while
     streams run on the worker it drains.

It records what it saw in a JSON report; the test asserts on it. Usage:
  python -m tests.support.ray_scenario --model DIR --jobs JOBS.json --out REPORT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from cluster.up_settings import UpSettings
from common.etcd.local import running_etcd
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.cluster import (
    Cluster,
    WorkerInfo,
    fetch,
    metric,
    metric_sum,
    tandem_up,
    worker_status,
)
from tests.support.cluster_workload import Expected, Job, run_grpc

RAY_PORT = 26379  # outside 10002-19999, Ray's worker port range
VENV_BIN = Path(sys.executable).parent
NODE_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "UCX_NET_DEVICES": "lo", "UCX_MODULES": "^ib"}


def _state_after_kill(handle: object, timeout_s: float) -> str:
    """"dead" once a call on the killed actor fails as a dead actor's, "alive" if it still answers after
    `timeout_s`: `ray.kill` is asynchronous, so a call sent right after it may still be served (seen on a
    loaded 2-core machine)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(handle.info.remote(), timeout=5)  # type: ignore[attr-defined]
        except ray.exceptions.ActorDiedError:
            return "dead"
        except ray.exceptions.GetTimeoutError:
            pass
        if time.monotonic() >= deadline:
            return "alive"
        time.sleep(0.5)

def start_ray() -> str:
    address = f"127.0.0.1:{RAY_PORT}"
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 << 20), "--disable-usage-stats"]
    subprocess.run([str(VENV_BIN / "ray"), "start", "--head", "--port", str(RAY_PORT), "--num-cpus", "1",
                    "--resources", json.dumps({"prefill": 1, "router": 1}), "--include-dashboard", "false", *common],
                   env=NODE_ENV, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([str(VENV_BIN / "ray"), "start", "--address", address, "--num-cpus", "2",
                    "--resources", json.dumps({"decode": 2}), *common],
                   env=NODE_ENV, check=True, stdout=subprocess.DEVNULL)
    return address


def wait_for(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def current_workers(cluster: Cluster) -> dict[str, WorkerInfo]:
    """The latest incarnation announced for each actor."""
    latest: dict[str, WorkerInfo] = {}
    for w in list(cluster.workers):
        latest[w.actor] = w
    return latest


def health_workers(http_url: str) -> int:
    try:
        return int(json.loads(fetch(f"{http_url}/health"))["workers"])
    except OSError:
        return -1


class Load:
    """Clients sending the workload's requests one after another until stopped; every outcome kept."""

    def __init__(self, address: str, jobs: list[Job], expected: list[Expected], clients: int = 3) -> None:
        self.address, self.jobs, self.expected = address, jobs, expected
        self.outcomes: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.get_running_loop().create_task(self._client(c)) for c in range(clients)]

    async def _client(self, c: int) -> None:
        i = c
        while not self._stop.is_set():
            job = i % len(self.jobs)
            try:
                got = await run_grpc(self.address, self.jobs[job])
                self.outcomes.append({"job": job, "ok": True, "equal": got == self.expected[job]})
            except grpc.aio.AioRpcError as e:
                self.outcomes.append({"job": job, "ok": False, "error": f"{e.code().name}: {e.details()}"})
            i += 3

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def pools_report(workers: list[WorkerInfo]) -> list[dict[str, Any]]:
    report = []
    for w in workers:
        deadline = time.monotonic() + 15
        while True:
            status = await worker_status(w)
            idle = status.running == status.waiting == 0 and status.free_blocks == status.total_blocks
            if idle or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        report.append({"worker": w.worker_id, "integrity_ok": status.pool_integrity_ok, "idle": idle})
    return report


def phase_errors(ray_address: str, model: str) -> dict[str, Any]:
    """`tandem up --ray` set up wrong: it exits 1 with the cause, soon."""
    out: dict[str, Any] = {}
    for name, extra in (("bad_model", ["--model", "/nonexistent/model"]),
                        ("no_gpus", ["--model", model, "--ray-placement", "gpus"])):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--ray", ray_address, "--http-port", "0",
                               "--grpc-port", "0", *extra], env=NODE_ENV, capture_output=True, text=True, timeout=180)
        said = [line for line in proc.stderr.splitlines() if line.startswith("tandem up:")]
        out[name] = {"rc": proc.returncode, "said": said, "seconds": time.monotonic() - started}
    return out


async def phase_a(ray_address: str, model: str, jobs: list[Job], expected: list[Expected]) -> dict[str, Any]:
    import ray

    out: dict[str, Any] = {}
    with tandem_up("--ray", ray_address, "--model", model, "--dtype", "float32", "--prefill", "1", "--decode", "2",
                   "--min-remote-prefill-tokens", "4", "--num-kv-blocks", "128", "--grace-s", "5",
                   # the planner on Ray, held at these sizes by its bounds: it sees the fleet's counts
                   "--planner", "true", "--planner-interval-s", "1", "--planner-window-s", "2",
                   "--min-decode-workers", "2", "--max-decode-workers", "2", "--min-prefill-workers", "1",
                   "--max-prefill-workers", "1", timeout_s=240, env=NODE_ENV) as cluster:
        ray.init(address=ray_address, namespace="tandem-default", log_to_driver=False)
        out["nodes"] = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        out["placement"] = [asdict(w) for w in cluster.workers]
        assert cluster.router is not None
        out["router_node"] = cluster.router.node
        results = [await run_grpc(cluster.grpc_address, job) for job in jobs]
        out["equal"] = [got == want for got, want in zip(results, expected, strict=True)]

        load = Load(cluster.grpc_address, jobs, expected)
        await asyncio.sleep(2)
        victim = current_workers(cluster)[next(a for a, w in current_workers(cluster).items() if w.role == "decode")]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        restarted = await asyncio.to_thread(wait_for, lambda: (w := current_workers(cluster)[victim.actor]).pid
                                            != victim.pid and w, 120, "the SIGKILLed decode actor's restart")
        out["restart"] = {"actor": victim.actor, "old": asdict(victim), "new": asdict(restarted),
                          "seconds": time.monotonic() - killed_at}
        await asyncio.to_thread(wait_for, lambda: health_workers(cluster.http_url) == 3, 60, "3 workers again")

        prefill = next(w for w in current_workers(cluster).values() if w.role == "prefill")
        ray.kill(ray.get_actor(prefill.actor), no_restart=True)
        replacement = await asyncio.to_thread(
            wait_for, lambda: next((w for a, w in current_workers(cluster).items()
                                    if w.role == "prefill" and a != prefill.actor), None), 120,
            "a replacement of the prefill actor")
        out["replace"] = {"actor": prefill.actor, "old": asdict(prefill), "new": asdict(replacement)}
        await asyncio.to_thread(wait_for, lambda: health_workers(cluster.http_url) == 3, 60, "3 workers again")
        await asyncio.sleep(3)  # the new workers take part in the load
        await load.stop()
        out["load"] = load.outcomes
        live = [w for a, w in current_workers(cluster).items() if a != prefill.actor]
        out["restarted_worker_tokens"] = metric(fetch(f"http://127.0.0.1:{restarted.metrics_port}/metrics"),
                                                "tandem_generation_tokens_total")
        out["pools"] = await pools_report(live)
        assert cluster.planner is not None, "tandem up announced no planner"
        planner_port = cluster.planner.metrics_port
        planner = fetch(f"http://127.0.0.1:{planner_port}/metrics")
        out["planner"] = {f"{name}/{pool}": metric(planner, f"tandem_planner_{name}", pool=pool)
                          for name in ("current_replicas", "desired_replicas") for pool in ("prefill", "decode")}
        out["planner"]["decisions/decode"] = metric_sum(planner, "tandem_planner_decisions_total", pool="decode")
        out["output_lines"] = cluster.output
    out["tandem_up_exit"] = 0  # tandem_up raises on any other exit code
    ray.shutdown()
    return out


async def phase_b(ray_address: str, model: str, streams: list[Job], expected: list[Expected]) -> dict[str, Any]:
    """The fleet as the planner's actuator, from this process as the Ray driver."""
    import ray

    from cluster.ray_backend.fleet import ActorFleet, Member
    from cluster.ray_backend.launcher import ActorFactory, namespace
    from cluster.ray_backend.placement import plan_placement

    out: dict[str, Any] = {}
    os.environ.update({k: v for k, v in NODE_ENV.items() if k.startswith("UCX_")})
    settings = UpSettings(ray=ray_address, model=model, dtype="float32", prefill=1, decode=1, policy="round_robin",
                          min_remote_prefill_tokens=4, num_kv_blocks=128, grace_s=20.0, http_port=0, grpc_port=0)
    ray.init(address=ray_address, namespace=namespace(settings.cluster), log_to_driver=False)
    announced: list[Member] = []
    with running_etcd() as etcd:
        placement = plan_placement("auto", ray.cluster_resources(), ["router", "prefill", "decode"], 1.0,
                                   ray.get_runtime_context().get_node_id())
        fleet = ActorFleet(ActorFactory(settings, etcd, placement), announced.append, settings.grace_s + 5)
        try:
            fleet.start({"router": 1, "prefill": 1, "decode": 1})
            await asyncio.to_thread(fleet.wait_ready, 240)
            router = fleet.serving("router")[0].info
            assert router is not None
            grpc_address, http_url = router.fields[1], router.fields[2]
            await asyncio.to_thread(wait_for, lambda: health_workers(http_url) == 2, 60, "2 workers")

            fleet.scale("decode", 2)
            out["replicas_after_up"] = fleet.current_replicas("decode")
            # the router sees the new worker in etcd; the fleet hears of it on its next poll of the actor
            await asyncio.to_thread(wait_for, lambda: (fleet.supervise(), health_workers(http_url) == 3
                                                       and all(m.info for m in fleet.serving()))[1], 120,
                                    "the added decode worker, seen by the router and by the fleet")
            newest = fleet.serving("decode")[-1]
            out["added_node"] = newest.info.node_id if newest.info else ""

            received: list[list[int]] = [[] for _ in streams]
            started = asyncio.Event()

            async def consume(i: int, stub: inference_pb2_grpc.InferenceStub) -> str:
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=streams[i].ids), sampling=pb.SamplingParameters(
                    temperature=0.0, max_tokens=streams[i].max_tokens, ignore_eos=True))
                try:
                    async for chunk in stub.Generate(request, timeout=120):
                        received[i] += chunk.token_ids
                        if all(len(r) >= 3 for r in received):
                            started.set()
                except grpc.aio.AioRpcError as e:
                    return f"{e.code().name}: {e.details()}"
                return "ok"

            async with grpc.aio.insecure_channel(grpc_address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                tasks = [asyncio.create_task(consume(i, stub)) for i in range(len(streams))]
                await asyncio.wait_for(started.wait(), 60)
                drained = fleet.serving("decode")[-1]
                assert drained.info is not None
                worker_id, address, metrics_port = drained.info.fields
                status = await worker_status(WorkerInfo(worker_id, "decode", address, drained.info.pid,
                                                        int(metrics_port)))
                out["drained_running"] = status.running  # streams on the worker about to be drained
                fleet.scale("decode", 1)
                out["replicas_after_down"] = fleet.current_replicas("decode")
                out["cut_at"] = [len(r) for r in received]
                while not all(t.done() for t in tasks):
                    fleet.supervise()
                    await asyncio.sleep(0.2)
                out["streams"] = [t.result() for t in tasks]
            out["equal"] = [tuple(r) == e.token_ids for r, e in zip(received, expected, strict=True)]
            await asyncio.to_thread(wait_for, lambda: (fleet.supervise(), drained not in fleet.members())[1], 60,
                                    "the drained actor to be stopped")
            out["drained_actor"] = await asyncio.to_thread(_state_after_kill, drained.handle, 30.0)
            out["workers_after_down"] = await asyncio.to_thread(
                wait_for, lambda: (n := health_workers(http_url)) == 2 and n, 30, "2 workers")
            out["migrations"] = metric(fetch(f"{http_url}/metrics"), "tandem_router_migrations_total",
                                       error="unavailable")
        finally:
            await asyncio.to_thread(fleet.stop)
    ray.shutdown()
    return out


def load_jobs(spec: dict[str, Any], jobs_key: str, expected_key: str) -> tuple[list[Job], list[Expected]]:
    """The jobs and their expected outputs that the test wrote under these keys of its JSON spec."""
    jobs = [Job(j["kind"], tuple(j["ids"]), j["text"], j["max_tokens"], j["ignore_eos"]) for j in spec[jobs_key]]
    return jobs, [Expected(tuple(e["token_ids"]), e["text"], e["finish_reason"]) for e in spec[expected_key]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.jobs).read_text())
    jobs, expected = load_jobs(spec, "jobs", "expected")
    streams = [Job("ids", tuple(s["ids"]), "", s["max_tokens"], True) for s in spec["streams"]]
    streams_expected = [Expected(tuple(e["token_ids"]), e["text"], e["finish_reason"])
                        for e in spec["streams_expected"]]
    report: dict[str, Any] = {}
    try:
        ray_address = start_ray()
        report["errors"] = phase_errors(ray_address, args.model)
        report["a"] = asyncio.run(phase_a(ray_address, args.model, jobs, expected))
        report["b"] = asyncio.run(phase_b(ray_address, args.model, streams, streams_expected))
    except BaseException:
        report["error"] = traceback.format_exc()
    Path(args.out).write_text(json.dumps(report, indent=1))
    sys.exit(1 if "error" in report else 0)


if __name__ == "__main__":
    main()
