"""The goodput case for disaggregation, on simulated devices (engine.simulated): a fixed budget of devices
split every way between prefill and decode workers, and the same budget as aggregated workers, under each
workload at several request rates; goodput is the rate of requests that met both the TTFT and the TPOT
objective (DistServe's), and a configuration's goodput at a workload is the highest rate it served with
at least `--attainment` of its requests within both.

    python -m bench.sim_goodput --profile P.json [--devices 8] [--splits 1 2 4 6] [--workload sharegpt ...]
                                [--rates 8 16 32] [--slowdown 4] [--seconds 20] [--json out.json]

`--slowdown K` runs the simulation K times slower than the hardware it models (every step time times K,
every rate over K) so that the real processes on this machine (router, clients, the workers' own
scheduling and streaming) stay small beside the modelled steps; every figure is reported in the modelled
hardware's time (latencies over K, rates times K). A run at two slowdowns that agree is the check that
this machine's own CPU time is not what was measured. The KV transfer between a prefill and a decode
worker runs the real control path over TCP on token-sized placeholder pages; its time is the profile's
link model for the real model's bytes when the profile has one (bench.sim_profile --kv-transfer), else ~0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.serve.metrics import SLO, summarize
from bench.serve.runner import RunSpec, run
from bench.serve.workloads import WORKLOADS, WorkloadName, generate
from bench.throughput import machine_info
from cluster.up_process import tandem_up
from engine.simulated.profile import SimulationProfile

# per workload: TTFT and TPOT objectives (ms, in the modelled hardware's time) and rates (requests/s)
DEFAULT_SLO_MS: dict[str, tuple[float, float]] = {"sharegpt": (400.0, 80.0), "long_prompt": (1500.0, 80.0),
                                                   "long_answer": (400.0, 80.0), "multiturn": (400.0, 80.0)}


@dataclass(frozen=True)
class Split:
    """`prefill` + `decode` disaggregated workers, or (prefill 0) `decode` aggregated ones."""
    prefill: int
    decode: int

    @property
    def name(self) -> str:
        return f"{self.prefill}P:{self.decode}D" if self.prefill else f"{self.decode} aggregated"

    def up_args(self) -> tuple[str, ...]:
        if self.prefill:
            return "--prefill", str(self.prefill), "--decode", str(self.decode), "--both", "0"
        return "--prefill", "0", "--decode", "0", "--both", str(self.decode)


def splits(devices: int, prefill_counts: list[int] | None) -> list[Split]:
    counts = prefill_counts if prefill_counts is not None else list(range(1, devices))
    if any(not 0 < p < devices for p in counts):
        raise ValueError(f"each prefill count must be between 1 and {devices - 1}")
    return [Split(0, devices), *(Split(p, devices - p) for p in counts)]


def _scaled_summary(summary: dict[str, Any], k: float) -> dict[str, Any]:
    """`summary` (bench.serve.metrics) from dilated wall time back to the modelled hardware's time."""
    out = dict(summary)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        out[key] = {q: None if v is None else v / k for q, v in summary[key].items()}
    for key in ("requests_per_s", "output_tokens_per_s", "goodput_rps"):
        out[key] = summary[key] * k
    out["duration_s"] = summary["duration_s"] / k
    out["slo"] = {name: ms / k for name, ms in summary["slo"].items()}
    out["attainment"] = summary["slo_met"] / summary["requests"] if summary["requests"] else 0.0
    return out


async def _measure(address: str, workload: WorkloadName, rate: float, args: argparse.Namespace,
                   seed: int) -> dict[str, Any]:
    k = args.slowdown
    ttft_ms, tpot_ms = args.slo[workload]
    wall_rate, wall_seconds = rate / k, args.seconds
    sessions = generate(workload, max(int(wall_rate * wall_seconds), 1), seed, vocab=args.vocab,
                        max_prompt=args.max_prompt, max_answer=args.max_answer)
    spec = RunSpec("grpc", address, wall_rate, 1.0, args.concurrency, wall_seconds + 1, args.timeout_s * k, seed,
                   progress=False)
    busy_before = _cpu_busy()
    results, elapsed = await run(sessions, spec)
    summary = _scaled_summary(summarize(results, elapsed, SLO(ttft_ms * k, tpot_ms * k)), k)
    busy, total = (after - before for after, before in zip(_cpu_busy(), busy_before, strict=True))
    summary["machine_cpu_busy"] = busy / total if total else 0.0  # every process here, the clients too
    return summary


def _cpu_busy() -> tuple[int, int]:
    """This machine's (busy, all) CPU jiffies since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def goodput(rows: list[dict[str, Any]], attainment: float) -> float:
    """The highest rate served with at least `attainment` of its requests within both objectives, every
    lower rate too (0 if none)."""
    best = 0.0
    for row in sorted(rows, key=lambda r: r["rate"]):
        if row["summary"]["attainment"] < attainment:
            break
        best = row["rate"]
    return best


async def _config(split: Split, profile_path: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    blocks = ("--num-kv-blocks", str(args.num_kv_blocks)) if args.num_kv_blocks else ()
    with tandem_up("--simulate", profile_path, *split.up_args(), "--kv-backends", "tcp", *blocks,
                   "--max-num-seqs", str(args.max_num_seqs), "--max-inflight", "4096", "--planner", "false",
                   stderr=None if args.verbose else subprocess.DEVNULL) as cluster:
        for w, workload in enumerate(args.workload):
            for i, rate in enumerate(args.rates[workload]):
                summary = await _measure(cluster.grpc_address, workload, rate, args, seed=1000 * w + i)
                rows.append({"config": split.name, "prefill": split.prefill, "decode": split.decode,
                             "workload": workload, "rate": rate, "summary": summary})
                s = summary
                print(f"{split.name:>14} {workload:>11} {rate:>6g}/s: {s['completed']}/{s['requests']} ok, "
                      f"TTFT p90 {s['ttft_ms']['p90'] or 0:.0f} ms, TPOT p90 {s['tpot_ms']['p90'] or 0:.1f} ms, "
                      f"attainment {s['attainment']:.0%}, machine CPU {s['machine_cpu_busy']:.0%} busy", flush=True)
    return rows


def _parse_slo(items: list[str]) -> dict[str, tuple[float, float]]:
    slo = dict(DEFAULT_SLO_MS)
    for item in items:
        name, _, values = item.partition("=")
        ttft, _, tpot = values.partition(",")
        slo[name] = (float(ttft), float(tpot))
    return slo


def _parse_rates(items: list[str], workloads: list[str]) -> dict[str, list[float]]:
    """`8,16,32` for every workload, or `sharegpt=8,16,32` for one."""
    rates: dict[str, list[float]] = {}
    for item in items:
        name, _, values = item.rpartition("=")
        for w in ([name] if name else workloads):
            rates[w] = [float(v) for v in values.split(",")]
    missing = [w for w in workloads if w not in rates]
    if missing:
        raise SystemExit(f"no rates for {missing}")
    return rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim_goodput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="a simulation profile (bench.sim_profile's JSON)")
    p.add_argument("--devices", type=int, default=8, help="workers in every configuration")
    p.add_argument("--splits", type=int, nargs="*", default=None, help="prefill counts to try (default: all)")
    p.add_argument("--workload", nargs="+", choices=WORKLOADS, default=["sharegpt", "long_prompt"])
    p.add_argument("--rates", nargs="+", default=["sharegpt=8,16,32", "long_prompt=4,8,16"],
                   help="modelled requests/s: RATES for every workload or WORKLOAD=RATES (comma separated)")
    p.add_argument("--slo", nargs="*", default=[], help="WORKLOAD=TTFT_MS,TPOT_MS (modelled time)")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests within both objectives")
    p.add_argument("--slowdown", type=float, default=4.0, help="run the simulation this many times slower")
    p.add_argument("--seconds", type=float, default=20.0, help="wall seconds of arrivals per rate")
    p.add_argument("--concurrency", type=int, default=512, help="most requests in flight from the clients")
    p.add_argument("--max-num-seqs", type=int, default=64, help="each worker's batch")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="each worker's KV blocks (default: from memory)")
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-answer", type=int, default=128)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request, modelled time")
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--verbose", action="store_true", help="the cluster's logs on stderr")
    args = p.parse_args(argv)
    args.slo, args.rates = _parse_slo(args.slo), _parse_rates(args.rates, args.workload)
    profile = SimulationProfile.load(args.profile)
    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tandem-goodput-") as tmp:
        slowed = pathlib.Path(tmp) / "profile.json"
        slowed.write_text(profile.slowed(args.slowdown).to_json())
        for split in splits(args.devices, args.splits):
            rows += asyncio.run(_config(split, str(slowed), args))
    best: dict[str, Any] = {}
    for workload in args.workload:
        per_config = {r["config"]: goodput([x for x in rows if x["config"] == r["config"]
                                            and x["workload"] == workload], args.attainment)
                      for r in rows if r["workload"] == workload}
        top = max(per_config.values())
        best[workload] = {"goodput_rps": per_config, "best": [c for c, g in per_config.items() if g == top]}
        print(f"{workload}: goodput (req/s at >= {args.attainment:.0%} within both objectives) "
              + ", ".join(f"{c} {g:g}" for c, g in per_config.items()) + f"; best {best[workload]['best']}")
    kv_transfer = (f"modelled: {profile.kv_s_per_byte:g} s/byte + {profile.kv_transfer_latency_s:g} s"
                   if profile.models_kv_transfer else "not modelled (real control path, ~0 s)")
    report = {"command": " ".join(["python", "-m", "bench.sim_goodput", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "machine": machine_info(),
              "profile": {"name": profile.name, "source": profile.source}, "devices": args.devices,
              "slowdown": args.slowdown, "seconds_per_rate": args.seconds, "attainment": args.attainment,
              "slo_ms": args.slo, "rates": args.rates, "kv_transfer": kv_transfer,
              "best": best, "runs": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
