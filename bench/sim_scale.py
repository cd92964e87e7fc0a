"""The control plane at scale, on simulated workers (engine.simulated): router throughput and its own
dispatch latency at several worker counts and routing policies.

    python -m bench.sim_scale --profile P.json [--workers 10 100 200] [--policies round_robin kv_aware]
                              [--clients 32] [--seconds 20] [--json out.json]

For each (worker count, policy): half prefill, half decode workers in fleets of `--per-process`, the real
router and etcd; `--clients` closed-loop gRPC clients send requests of `--prompt-tokens` random tokens
(prefilled remotely: longer than the workers' --min-remote-prefill-tokens) for `--max-tokens` tokens each,
for `--seconds`. Reported: requests/s, client end-to-end p50/p99, the router's dispatch time p50/p99
(`tandem_router_dispatch_seconds`, admission to the first worker call, over the run), and the CPU seconds
the router and the fleets used meanwhile; before the load, the idle cluster's CPU (cores) over
`--idle-seconds` and the fleets' resident memory. With `--py-spy DIR`, the router is sampled over the
load (bench.pyspy: the raw stacks in DIR, the top functions in the JSON). Everything shares this
machine's cores: the clients, the router, etcd and every fleet; the router's CPU per request is what
carries over to a machine of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import pyspy
from bench.sim_clients import ClientLoad, Outcome, closed_loop
from bench.sim_cluster import cpu_seconds, sim_cluster
from bench.throughput import machine_info
from cluster.planner.observation import Buckets, bucket_delta, quantile_from_buckets
from engine.simulated.profile import SimulationProfile

DISPATCH = "tandem_router_dispatch_seconds"


def dispatch_buckets(text: str) -> Buckets:
    found: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{DISPATCH}_bucket":
                found[float(sample.labels["le"])] = sample.value
    return sorted(found.items())


def run_load(load: ClientLoad, seconds: float) -> dict[str, Any]:
    """`load` for `seconds` (the requests then in flight finish): req/s and client end-to-end latency."""
    outcomes: list[Outcome] = []
    started = time.monotonic()
    stop_at = started + seconds
    asyncio.run(closed_loop(load, lambda: time.monotonic() >= stop_at, outcomes))
    elapsed = time.monotonic() - started
    latencies = sorted(o.ended - o.started for o in outcomes if o.code == "OK")
    errors = [o.code for o in outcomes if o.code != "OK"]

    def pick(q: float) -> float | None:
        return latencies[min(int(q * len(latencies)), len(latencies) - 1)] if latencies else None

    return {"requests": len(latencies), "errors": len(errors), "error_codes": sorted(set(errors)),
            "requests_per_s": len(latencies) / elapsed, "e2e_p50_s": pick(0.5), "e2e_p99_s": pick(0.99)}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def run_one(args: argparse.Namespace, workers: int, policy: str) -> dict[str, Any]:
    prefill, decode = workers // 2, workers - workers // 2
    started = time.monotonic()
    blocks = ("--num-kv-blocks", str(args.num_kv_blocks)) if args.num_kv_blocks else ()
    with sim_cluster(args.profile, prefill, decode, args.per_process, policy, args.model,
                     ("--min-remote-prefill-tokens", str(args.prompt_tokens // 2), *blocks),
                     starting_at_once=args.starting_at_once) as cluster:
        up_s = time.monotonic() - started
        seeing = time.monotonic()
        view_s = max(cluster.wait_until_seen(pool, count, 120) for pool, count in
                     (("prefill", prefill), ("decode", decode))) - seeing
        idle_router, idle_fleets = cpu_seconds(cluster.router.pid), cluster.fleets_cpu_seconds()
        time.sleep(args.idle_seconds)  # nothing sent: what the registered, idle workers cost by themselves
        idle_router = (cpu_seconds(cluster.router.pid) - idle_router) / args.idle_seconds
        idle_fleets = (cluster.fleets_cpu_seconds() - idle_fleets) / args.idle_seconds
        fleets_rss_mib = sum(_rss_mib(p.pid) for p in cluster.fleets)
        before = dispatch_buckets(cluster.router_metrics())
        stacks = None if args.py_spy is None else pathlib.Path(args.py_spy) / f"router-{workers}-{policy}.txt"
        sampling = None if stacks is None else pyspy.record(cluster.router.pid, args.seconds, stacks)
        router_cpu, fleet_cpu = cpu_seconds(cluster.router.pid), cluster.fleets_cpu_seconds()
        load = run_load(ClientLoad(cluster.grpc_address, args.clients, args.prompt_tokens, args.max_tokens,
                                   args.vocab, seed=11), args.seconds)
        router_cpu = cpu_seconds(cluster.router.pid) - router_cpu
        fleet_cpu = cluster.fleets_cpu_seconds() - fleet_cpu
        window = bucket_delta(dispatch_buckets(cluster.router_metrics()), before)
        if sampling is not None:
            pyspy.finish(sampling)
    profile = {} if stacks is None else {"router_profile": {"stacks": str(stacks), **pyspy.summarize(stacks)}}
    return {"workers": workers, "policy": policy, "startup_s": up_s, "router_view_s": view_s, **load,
            "dispatch_p50_s": quantile_from_buckets(0.5, window), "dispatch_p99_s": quantile_from_buckets(0.99, window),
            "router_cpu_s": router_cpu, "fleets_cpu_s": fleet_cpu, "idle_router_cores": idle_router,
            "idle_fleets_cores": idle_fleets, "fleets_rss_mib": fleets_rss_mib,
            "router_cpu_ms_per_request": 1000 * router_cpu / max(load["requests"], 1), **profile}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", required=True, help="simulation profile (python -m bench.sim_profile)")
    p.add_argument("--model", help="the checkpoint whose tokenizer the router reads (default: the default model's)")
    p.add_argument("--workers", type=int, nargs="+", default=[10, 100, 200])
    p.add_argument("--policies", nargs="+", default=["round_robin", "kv_aware"])
    p.add_argument("--per-process", type=int, default=50)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="each worker's KV blocks (default: what the model's KV would get from the default memory); "
                        "fewer keep 1000 workers' placeholder pools small")
    p.add_argument("--starting-at-once", type=int, default=0,
                   help="fleets started together (0: all); fewer keep etcd answering on a small machine")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--idle-seconds", type=float, default=5.0, help="CPU of the idle cluster, before the load")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--vocab", type=int, help="prompt token ids are drawn below this (default: the profile's model's)")
    p.add_argument("--py-spy", metavar="DIR", help="sample the router over each load into DIR (bench.pyspy)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.py_spy is not None:
        pathlib.Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    if args.vocab is None:
        args.vocab = SimulationProfile.load(args.profile).model.vocab_size
    runs = []
    for workers in args.workers:
        for policy in args.policies:
            print(f"{workers} workers, {policy} ...", file=sys.stderr, flush=True)
            runs.append(run_one(args, workers, policy))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"machine": machine_info(), "config": vars(args), "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{'workers':>8} {'policy':>12} {'req/s':>8} {'e2e p50':>9} {'e2e p99':>9} {'dispatch p50':>13} "
          f"{'dispatch p99':>13} {'router cpu/req':>15} {'errors':>7}")
    for r in runs:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.2f} ms"
        print(f"{r['workers']:>8} {r['policy']:>12} {r['requests_per_s']:>8.1f} {ms(r['e2e_p50_s']):>9} "
              f"{ms(r['e2e_p99_s']):>9} {ms(r['dispatch_p50_s']):>13} {ms(r['dispatch_p99_s']):>13} "
              f"{r['router_cpu_ms_per_request']:>12.2f} ms {r['errors']:>7}")


if __name__ == "__main__":
    main()
