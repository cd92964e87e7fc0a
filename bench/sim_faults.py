"""Membership and faults at scale, on simulated workers (engine.simulated): how fast the router sees a
worker join and die, what etcd and the KV-event streams carry, and what the router's clients see when a
tenth of the workers is SIGKILLed, when etcd restarts, and when a fleet is frozen (SIGSTOP) past its lease.

    python -m bench.sim_faults --profile P.json [--workers 100] [--clients 32] [--json out.json]

The cluster: `--workers` simulated workers, half prefill and half decode, in fleets of a tenth of them each
(bench.sim_cluster), one etcd and the real router. Measured:
- membership: a one-worker decode fleet started and later SIGKILLed; the seconds from its READY line (it is
  registered) to the router routing to it, and from the SIGKILL to the router dropping it (its lease
  expires: bench.sim_cluster's TTL) -- `--repeats` times;
- traffic, idle and under load: etcd's gRPC messages received and sent per second (its /metrics), and the
  KV-event batches and block hashes per second the router received;
- faults, under `--clients` closed-loop gRPC clients (greedy, `--max-tokens` each): SIGKILL of one decode
  fleet (10% of all workers), a prefill fleet SIGSTOPped for `--freeze-s` (beyond the lease) then
  continued, and last a SIGKILL and restart of etcd (with the seconds until it is healthy again, or that it
  was not within `--etcd-timeout-s`, and how many live decode workers are still registered a lease TTL
  after that).
  Per phase: requests ended, failed (by status), streams lost after their first token, the router's
  retries and migrations, and when the last failure came.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import subprocess
import sys
import time
from typing import Any

from bench.scrape import fetch, metric_sum
from bench.sim_clients import BackgroundClients, ClientLoad, Outcome
from bench.sim_cluster import LEASE_TTL_S, SimCluster, sim_cluster
from bench.throughput import machine_info
from engine.simulated.profile import SimulationProfile


def _load(cluster: SimCluster, args: argparse.Namespace) -> ClientLoad:
    # a client waits 0.2 s after a failure, as a real one would: failures are not counted at spin rate
    return ClientLoad(cluster.grpc_address, args.clients, args.prompt_tokens, args.max_tokens, args.vocab, seed=3,
                      backoff_s=0.2)


def _router_counters(cluster: SimCluster) -> dict[str, float]:
    text = cluster.router_metrics()
    return {"retries": metric_sum(text, "tandem_router_retries_total"),
            "migrations": metric_sum(text, "tandem_router_migrations_total"),
            "kv_event_batches": metric_sum(text, "tandem_router_kv_event_batches_total"),
            "kv_event_hashes": metric_sum(text, "tandem_router_kv_event_hashes_total")}


def _etcd_messages(cluster: SimCluster) -> dict[str, float]:
    text = fetch(f"http://{cluster.etcd}/metrics")
    return {"received": metric_sum(text, "grpc_server_msg_received_total"),
            "sent": metric_sum(text, "grpc_server_msg_sent_total")}


def _traffic(cluster: SimCluster, seconds: float) -> dict[str, float]:
    """Per second over `seconds`: etcd's gRPC messages and the router's KV-event batches and hashes."""
    etcd, router = _etcd_messages(cluster), _router_counters(cluster)
    time.sleep(seconds)
    etcd_after, router_after = _etcd_messages(cluster), _router_counters(cluster)
    return {"etcd_msgs_received_per_s": (etcd_after["received"] - etcd["received"]) / seconds,
            "etcd_msgs_sent_per_s": (etcd_after["sent"] - etcd["sent"]) / seconds,
            "kv_event_batches_per_s": (router_after["kv_event_batches"] - router["kv_event_batches"]) / seconds,
            "kv_event_hashes_per_s": (router_after["kv_event_hashes"] - router["kv_event_hashes"]) / seconds}


def membership(cluster: SimCluster, decode: int, repeats: int) -> dict[str, Any]:
    joins, leaves = [], []
    for i in range(repeats):
        proc = cluster.spawn_fleet("decode", 1, f"late-{i}")
        cluster.ready_fleet(proc, 1, 120)
        ready = time.monotonic()
        joins.append(cluster.wait_until_seen("decode", decode + 1, 60) - ready)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        leaves.append(cluster.wait_until_seen("decode", decode, 60) - killed)
        proc.wait()
    return {"join_s": joins, "leave_s": leaves, "lease_ttl_s": LEASE_TTL_S}


def _phase(outcomes: list[Outcome], start: float, end: float, before: dict[str, float],
           after: dict[str, float]) -> dict[str, Any]:
    inside = [o for o in outcomes if start <= o.ended < end]
    failed = [o for o in inside if o.code != "OK"]
    codes: dict[str, int] = {}
    for o in failed:
        codes[o.code] = codes.get(o.code, 0) + 1
    return {"ended": len(inside), "ok": len(inside) - len(failed), "failed": codes,
            "lost_after_first_token": sum(1 for o in failed if o.tokens > 0),
            "last_failure_after_s": max((o.ended - start for o in failed), default=None),
            "retries": after["retries"] - before["retries"], "migrations": after["migrations"] - before["migrations"]}


def faults(cluster: SimCluster, args: argparse.Namespace, decode_fleets: list[subprocess.Popen],
           prefill_fleets: list[subprocess.Popen]) -> dict[str, Any]:
    clients = BackgroundClients(_load(cluster, args)).start()
    marks: list[tuple[str, float, dict[str, float]]] = []
    recovery: dict[str, Any] = {}  # the etcd restart: seconds to etcd healthy, workers registered a TTL later

    def mark(name: str) -> None:
        marks.append((name, time.monotonic(), _router_counters(cluster)))
        print(f"{name} ...", file=sys.stderr, flush=True)

    try:
        time.sleep(args.phase_s)
        mark("steady")
        time.sleep(args.phase_s)
        mark("sigkill_10pct")
        for proc in decode_fleets[:1]:
            proc.send_signal(signal.SIGKILL)
        time.sleep(args.phase_s + LEASE_TTL_S)
        mark("sigstop_fleet")
        frozen = prefill_fleets[0]
        frozen.send_signal(signal.SIGSTOP)
        try:
            time.sleep(args.freeze_s)
        finally:
            frozen.send_signal(signal.SIGCONT)
        time.sleep(args.phase_s + LEASE_TTL_S)
        mark("etcd_restart")  # last: at a thousand workers on two cores etcd may not come back
        live_decode = int(cluster.seen("decode"))  # the killed fleet's workers are gone by now (their TTL passed)
        cluster.etcd_server.stop()
        time.sleep(2)
        restarted = time.monotonic()
        try:  # under every worker's reconnecting: measured, not assumed
            cluster.etcd_server.start(timeout_s=args.etcd_timeout_s)
            recovery["etcd_healthy_s"] = time.monotonic() - restarted
            # etcd restores its keys and leases from disk, so every record is back at once; the leases then
            # lapse unless their workers reach etcd again: what is still registered one TTL later is what
            # the workers kept alive (the router keeps its last view throughout)
            time.sleep(LEASE_TTL_S + 2)
            recovery["live_decode"], recovery["registered_after_ttl"] = live_decode, cluster.registered("decode")
        except (RuntimeError, OSError) as e:
            recovery["not_recovered"] = str(e)
        time.sleep(args.phase_s)
        mark("end")
    finally:
        clients.stop()
    phases: dict[str, Any] = {name: _phase(clients.outcomes, start, next_start, counters, next_counters)
                              for (name, start, counters), (_, next_start, next_counters) in itertools.pairwise(marks)}
    phases["etcd_restart"]["recovery"] = recovery
    return phases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim_faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="simulation profile (python -m bench.sim_profile)")
    p.add_argument("--workers", type=int, default=100, help="half prefill, half decode; a multiple of 20")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="membership: joins and deaths timed")
    p.add_argument("--phase-s", type=float, default=10.0, help="seconds of load around each fault")
    p.add_argument("--freeze-s", type=float, default=15.0, help="how long the frozen fleet stays stopped")
    p.add_argument("--traffic-s", type=float, default=10.0)
    p.add_argument("--etcd-timeout-s", type=float, default=120.0,
                   help="the etcd restart: how long etcd, then the workers' registrations, may take to come back")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="each worker's KV blocks (default: from memory)")
    p.add_argument("--starting-at-once", type=int, default=0, help="fleets started together (0: all)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.workers % 20:
        raise SystemExit("--workers must be a multiple of 20 (fleets of a tenth, half of them each role)")
    args.vocab = SimulationProfile.load(args.profile).model.vocab_size
    half, per_fleet = args.workers // 2, args.workers // 10
    started = time.time()
    blocks = ("--num-kv-blocks", str(args.num_kv_blocks)) if args.num_kv_blocks else ()
    with sim_cluster(args.profile, half, half, per_fleet,
                     worker_args=("--min-remote-prefill-tokens", str(args.prompt_tokens // 2), *blocks),
                     starting_at_once=args.starting_at_once) as cluster:
        decode_fleets = [f for f in cluster.fleets if cluster.roles[f.pid] == "decode"]
        prefill_fleets = [f for f in cluster.fleets if cluster.roles[f.pid] == "prefill"]
        cluster.wait_until_seen("decode", half, 120)
        idle = _traffic(cluster, args.traffic_s)
        print(json.dumps({"traffic_idle": idle}), file=sys.stderr, flush=True)
        joined = membership(cluster, half, args.repeats)
        print(json.dumps({"membership": joined}), file=sys.stderr, flush=True)
        clients = BackgroundClients(_load(cluster, args)).start()
        try:
            time.sleep(3)
            loaded = _traffic(cluster, args.traffic_s)
        finally:
            clients.stop()
        print(json.dumps({"traffic_loaded": loaded}), file=sys.stderr, flush=True)
        phases = faults(cluster, args, decode_fleets, prefill_fleets)
        for proc in prefill_fleets + decode_fleets:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
    result = {"command": " ".join(["python", "-m", "bench.sim_faults", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "machine": machine_info(),
              "workers": args.workers, "fleet_size": per_fleet, "clients": args.clients,
              "traffic_idle": idle, "traffic_loaded": loaded, "membership": joined, "faults": phases}
    print(json.dumps({k: result[k] for k in ("traffic_idle", "traffic_loaded", "membership", "faults")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
