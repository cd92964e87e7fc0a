"""Serving benchmark: TTFT, ITL, TPOT, E2E, throughput and goodput of a cluster under load.

    python -m bench.serve --url http://127.0.0.1:8000 [--workload sharegpt] [--rate 1 2 4] ...
    python -m bench.serve --config agg="--both 2 --prefill 0 --decode 0" \\
                          --config disagg="--prefill 1 --decode 1" --rate 0.5 1 2 --out bench/results/x

`--url` (OpenAI API) or `--grpc` drives a running cluster; each `--config NAME=ARGS` starts one
with `tandem up ARGS` (one after another, on loopback), runs every rate against it, and stops it.
Writes OUT/results.json (summaries, per-worker metric deltas) and OUT/*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
from contextlib import ExitStack
from typing import Any

from bench.scrape import metric_sum, worker_metrics
from bench.serve import plots
from bench.serve.client import RequestResult
from bench.serve.metrics import SLO, summarize
from bench.serve.runner import RunSpec, run
from bench.serve.workloads import WORKLOADS, generate
from cluster.up_process import LocalCluster, tandem_up

# worker metrics whose change over a run is recorded (summed over label sets unless split below)
_WORKER_COUNTERS = ("tandem_kv_transfer_seconds_sum", "tandem_kv_transfer_seconds_count",
                    "tandem_kv_transfer_bytes_total", "tandem_prefill_tokens_total")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="OpenAI-compatible base URL of a running router")
    target.add_argument("--grpc", help="host:port of a running router's tandem.v1.Inference")
    target.add_argument("--config", action="append", metavar="NAME=ARGS", help="start `tandem up ARGS` (repeatable)")
    p.add_argument("--api", choices=("openai", "grpc"), default="openai", help="with --config: which API to drive")
    p.add_argument("--workload", choices=WORKLOADS, default="sharegpt")
    p.add_argument("--num-sessions", type=int, default=64, help="requests (conversations for multiturn) per run")
    p.add_argument("--rate", type=float, nargs="+", default=[float("inf")], help="sessions/s; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--concurrency", type=int, default=64, help="most sessions in flight")
    p.add_argument("--duration-s", type=float, default=300.0, help="start no session after this")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-answer", type=int, default=128)
    p.add_argument("--vocab", type=int, default=49152, help="token ids are drawn below this (the model's vocabulary)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/serve"))
    p.add_argument("--no-progress", action="store_true")
    return p


def _snapshot(cluster: LocalCluster | None) -> dict[str, float]:
    if cluster is None:
        return {}
    values: dict[str, float] = {}
    for worker in cluster.workers:
        text = worker_metrics(worker)
        for name in _WORKER_COUNTERS:
            values[f"{worker.role}/{name}"] = values.get(f"{worker.role}/{name}", 0.0) + metric_sum(text, name)
        for kind in ("computed", "cached"):
            key = f"{worker.role}/prefill_tokens_{kind}"
            values[key] = values.get(key, 0.0) + metric_sum(text, "tandem_prefill_tokens_total", kind=kind)
        for op in ("store", "load", "evict", "drop"):  # the second KV tier's traffic (--kv-offload-gib)
            key = f"{worker.role}/kv_offload_{op}_blocks"
            values[key] = values.get(key, 0.0) + metric_sum(text, "tandem_kv_offload_blocks_total", op=op)
            if op in ("store", "load"):
                key = f"{worker.role}/kv_offload_{op}_seconds"
                values[key] = values.get(key, 0.0) + metric_sum(text, "tandem_kv_offload_seconds_total", op=op)
        for op, outcomes in (("get", ("hit", "miss", "corrupt", "failed")), ("put", ("stored", "present", "failed"))):
            for outcome in outcomes:  # the cluster KV store's traffic (--kv-store)
                key = f"{worker.role}/kv_store_{op}_{outcome}_blocks"
                values[key] = values.get(key, 0.0) + metric_sum(text, "tandem_kv_store_blocks_total", op=op,
                                                                outcome=outcome)
        for decision in ("remote", "local_short", "local_cached", "fallback", "local_no_blocks"):
            key = f"{worker.role}/decisions_{decision}"
            values[key] = values.get(key, 0.0) + metric_sum(text, "tandem_disaggregation_decisions_total",
                                                            decision=decision)
    return values


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


async def _one_rate(args: argparse.Namespace, api: str, target: str, rate: float, cluster: LocalCluster | None,
                    seed: int) -> tuple[dict[str, Any], list[RequestResult]]:
    """`seed` differs per rate (no run finds the previous run's prompts in a prefix cache) and is the
    same for every configuration (they all serve the same requests)."""
    sessions = generate(args.workload, args.num_sessions, seed, vocab=args.vocab, max_prompt=args.max_prompt,
                        max_answer=args.max_answer)
    spec = RunSpec(api, target, rate, args.burstiness, args.concurrency, args.duration_s, args.timeout_s, seed,
                   progress=not args.no_progress)
    before = _snapshot(cluster)
    results, elapsed = await run(sessions, spec)
    summary = summarize(results, elapsed, SLO(args.slo_ttft_ms, args.slo_tpot_ms))
    summary["cluster"] = _delta(before, _snapshot(cluster))
    return summary, results


def _print(label: str, rate: float, s: dict[str, Any]) -> None:
    def p(key: str, q: str) -> str:
        value = s[key][q]
        return "-" if value is None else f"{value:.0f}"
    print(f"{label:>12} rate {rate:>5}: {s['completed']}/{s['requests']} ok, {s['requests_per_s']:.2f} req/s, "
          f"{s['output_tokens_per_s']:.1f} tok/s, TTFT p50/p90/p99 {p('ttft_ms', 'p50')}/{p('ttft_ms', 'p90')}/"
          f"{p('ttft_ms', 'p99')} ms, ITL p50/p99 {p('itl_ms', 'p50')}/{p('itl_ms', 'p99')} ms, "
          f"TPOT p50 {p('tpot_ms', 'p50')} ms, goodput {s['goodput_rps']:.2f} req/s, "
          f"prefix hits {s['prefix_hit_rate']:.0%}", flush=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    targets: list[tuple[str, str | None]] = ([(c.split("=", 1)[0], c.split("=", 1)[1]) for c in args.config]
                                             if args.config else [("target", None)])
    report: dict[str, Any] = {"meta": {
        "command": " ".join(shlex.quote(a) for a in sys.argv), "date": datetime.datetime.now().isoformat(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus", "args": {
            k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}}, "runs": []}
    raw: dict[str, list[dict[str, Any]]] = {}
    by_config: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for name, up_args in targets:
        with ExitStack() as stack:
            cluster = stack.enter_context(tandem_up(*shlex.split(up_args))) if up_args is not None else None
            if cluster is not None:
                api, target = args.api, cluster.http_url if args.api == "openai" else cluster.grpc_address
            else:
                api, target = ("openai", args.url) if args.url else ("grpc", args.grpc)
            for i, rate in enumerate(args.rate):
                summary, results = await _one_rate(args, api, target, rate, cluster, args.seed + 1000 * i)
                _print(name, rate, summary)
                report["runs"].append({"config": name, "up": up_args, "rate": rate, "summary": summary})
                raw[f"{name} @ {rate}/s"] = [dataclasses.asdict(r) | {"tpot": r.tpot} for r in results]
                by_config.setdefault(name, []).append((rate, summary))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "requests.json").write_text(json.dumps(raw, default=str))
    plots.latency_cdfs(raw, args.out / "latency_cdf.png")
    plots.itl_over_time({k: v for k, v in raw.items() if k.endswith(f"@ {args.rate[-1]}/s")},
                        args.out / "itl_over_time.png")
    if len(args.rate) > 1:
        plots.versus_rate(by_config, args.out / "versus_rate.png")
    return report


def main(argv: list[str] | None = None) -> None:
    asyncio.run(main_async(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
