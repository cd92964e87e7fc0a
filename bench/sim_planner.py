"""The SLO planner started from a bad split, on simulated devices (engine.simulated): does it reach a good
P:D split within its worker budget, how long does it take, and does it oscillate?

    python -m bench.sim_planner --profile P.json [--start 1 7] [--workload long_prompt] [--rate 16]
                                [--slowdown 4] [--seconds 300] [--json out.json]

First `tandem profile` measures a capacity profile on one simulated prefill and one decode worker (the
planner's input, as in production). Then `tandem up --planner true` starts `--start` prefill and decode
workers under a Poisson load at `--rate` of `--workload`, with the TTFT and ITL targets as the planner's,
a budget of `--devices` workers and every pool bound at [1, devices - 1]. Recorded each second: the
router's pool sizes; at the end: every planner decision by reason, the split's changes over time (and
how often a pool's direction reversed), and the share of requests within both objectives in each
window. Times, rates and latencies are in the modelled hardware's time (bench.sim_goodput's
`--slowdown`); worker start-up is this machine's real process start, divided by the slowdown like the
rest, and the planner's intervals are given in modelled time too.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.scrape import fetch, metric
from bench.serve.metrics import SLO
from bench.serve.runner import RunSpec, run
from bench.serve.workloads import WORKLOADS, generate
from bench.sim_goodput import DEFAULT_SLO_MS
from bench.throughput import machine_info
from cluster.up_process import LocalCluster, tandem_up
from engine.simulated.profile import SimulationProfile

REPO = __file__.rsplit("/bench/", 1)[0]
REASONS = ("below_min", "above_max", "ttft_over_target", "itl_over_target", "prompt_load", "stream_load",
           "underloaded", "rebalance")


def _capacity_profile(profile: str, output: pathlib.Path, prompt_tokens: int, k: float) -> None:
    with tandem_up("--simulate", profile, "--prefill", "1", "--decode", "1", "--kv-backends", "tcp",
                   stderr=subprocess.DEVNULL) as cluster:
        subprocess.run([sys.executable, "-m", "cluster.cli", "profile", "--address", cluster.grpc_address,
                        "--output", str(output), "--prompt-tokens", str(prompt_tokens), "--prefill-s", "15",
                        "--prefill-concurrency", "8", "--decode-batches", "1,4,16,32,64", "--step-s", str(8.0 * k),
                        "--decode-tokens", "32", "--max-itl-s", str(2.0 * k), "--time-budget-s", "300",
                        "--max-token-id", "49000"],
                       cwd=REPO, check=True, timeout=400, stdout=subprocess.DEVNULL)


def _pools(cluster: LocalCluster) -> tuple[int, int]:
    text = fetch(f"{cluster.http_url}/metrics")
    return int(metric(text, "tandem_router_workers", pool="prefill")), int(
        metric(text, "tandem_router_workers", pool="decode"))


def reversals(sizes: list[int]) -> int:
    """How often a pool's size changed direction (up then down, or down then up)."""
    steps = [b - a for a, b in itertools.pairwise(sizes) if b != a]
    return sum(1 for a, b in itertools.pairwise(steps) if (a > 0) != (b > 0))


async def _drive(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    k = args.slowdown
    wall_s = args.seconds * k  # dilated: the modelled seconds take k times longer here
    sessions = generate(args.workload, int(args.rate * args.seconds), seed=5, vocab=args.vocab,
                        max_prompt=args.max_prompt, max_answer=args.max_answer)
    timeline: list[tuple[float, int, int]] = []
    started = time.monotonic()
    load = asyncio.create_task(run(sessions, RunSpec("grpc", cluster.grpc_address, args.rate / k, 1.0, 1024,
                                                     wall_s, args.timeout_s * k, 5, progress=False)))
    while not load.done():
        sizes = await asyncio.to_thread(_pools, cluster)
        modelled = (time.monotonic() - started) / k
        if not timeline or timeline[-1][1:] != sizes:
            timeline.append((round(modelled, 2), *sizes))
            print(f"t={modelled:7.1f}s  {sizes[0]}P:{sizes[1]}D", flush=True)
        await asyncio.sleep(1.0)
    results, _ = await load
    ttft_ms, tpot_ms = args.slo
    slo = SLO(ttft_ms * k, tpot_ms * k)
    window = args.window_s * k
    windows = []
    for i in range(int(wall_s // window) + 1):
        inside = [r for r in results if i * window <= r.sent_at < (i + 1) * window]
        if inside:
            windows.append({"from_s": i * args.window_s, "requests": len(inside),
                            "attainment": sum(1 for r in inside if slo.met_by(r)) / len(inside)})
    assert cluster.planner is not None, "tandem up announced no planner"
    planner = fetch(f"http://127.0.0.1:{cluster.planner.metrics_port}/metrics")
    decisions = {f"{pool} {action} {reason}": value for pool in ("prefill", "decode")
                 for action in ("scale_up", "scale_down") for reason in REASONS
                 if (value := metric(planner, "tandem_planner_decisions_total", pool=pool, action=action,
                                     reason=reason))}
    return {"timeline": timeline, "decisions": decisions, "windows": windows,
            "failed": sum(1 for r in results if not r.ok), "requests": len(results),
            "reversals": {"prefill": reversals([p for _, p, _ in timeline]),
                          "decode": reversals([d for _, _, d in timeline])},
            "final": timeline[-1][1:] if timeline else None,
            "settled_at_s": timeline[-1][0] if timeline else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sim_planner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="a simulation profile (bench.sim_profile's JSON)")
    p.add_argument("--devices", type=int, default=8, help="the planner's budget of workers")
    p.add_argument("--start", type=int, nargs=2, default=[1, 7], metavar=("PREFILL", "DECODE"))
    p.add_argument("--workload", choices=WORKLOADS, default="long_prompt")
    p.add_argument("--rate", type=float, default=16.0, help="modelled requests/s")
    p.add_argument("--seconds", type=float, default=300.0, help="modelled seconds of load")
    p.add_argument("--window-s", type=float, default=30.0, help="modelled seconds per attainment window")
    p.add_argument("--slo", type=float, nargs=2, default=None, metavar=("TTFT_MS", "TPOT_MS"),
                   help="objectives and the planner's targets (TTFT p90, ITL p90); default bench.sim_goodput's")
    p.add_argument("--interval-s", type=float, default=2.5, help="planner: modelled seconds between decisions")
    p.add_argument("--window-obs-s", type=float, default=10.0, help="planner: modelled observation window")
    p.add_argument("--cooldown-s", type=float, default=10.0, help="planner: modelled cooldown after scaling")
    p.add_argument("--scale-down-delay-s", type=float, default=20.0, help="planner: modelled comfort before shrinking")
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-answer", type=int, default=128)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request, modelled time")
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    args.slo = tuple(args.slo) if args.slo else DEFAULT_SLO_MS[args.workload]
    k, (ttft_ms, tpot_ms) = args.slowdown, args.slo
    profile = SimulationProfile.load(args.profile)
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="tandem-planner-") as tmp:
        slowed, capacity = pathlib.Path(tmp) / "profile.json", pathlib.Path(tmp) / "capacity.json"
        slowed.write_text(profile.slowed(k).to_json())
        prompt = sorted(len(s.turns[0].prompt_ids) for s in generate(args.workload, 64, seed=5,
                                                                     max_prompt=args.max_prompt))[32]
        _capacity_profile(str(slowed), capacity, prompt, k)
        capacity_profile = json.loads(capacity.read_text())
        print(f"capacity profile (dilated x{k:g}): {json.dumps(capacity_profile)}", flush=True)
        last = args.devices - 1
        planner = ("--planner", "true", "--ttft-target-s", f"{ttft_ms * k / 1e3:.4f}",
                   "--itl-target-s", f"{tpot_ms * k / 1e3:.4f}", "--capacity-profile", str(capacity),
                   "--planner-interval-s", str(args.interval_s * k), "--planner-window-s", str(args.window_obs_s * k),
                   "--cooldown-s", str(args.cooldown_s * k), "--scale-down-delay-s", str(args.scale_down_delay_s * k),
                   "--min-prefill-workers", "1", "--max-prefill-workers", str(last), "--min-decode-workers", "1",
                   "--max-decode-workers", str(last), "--max-total-workers", str(args.devices), "--grace-s", "5")
        log_path = pathlib.Path(tmp) / "cluster.log"
        with open(log_path, "w") as log, tandem_up(
                "--simulate", str(slowed), "--prefill", str(args.start[0]), "--decode", str(args.start[1]),
                "--kv-backends", "tcp", "--max-inflight", "4096", *planner, stderr=log.fileno()) as cluster:
            found = asyncio.run(_drive(cluster, args))
        # the planner's reasoning: every decision that acted, and how often each pool held for which reason
        marker = "cluster.planner: planner: "
        lines = [line.split(marker, 1)[1].strip() for line in log_path.read_text().splitlines()
                 if marker in line and "->" in line]
        found["actions"] = [line for line in lines if " hold " not in line]
        holds: dict[str, int] = {}
        for line in lines:
            if " hold " in line:
                key = f"{line.split()[0]} {line.split('reason=')[1].split()[0]}"
                holds[key] = holds.get(key, 0) + 1
        found["holds"] = holds
        found["planner_log"] = lines  # every decision the planner logged (a hold is logged when its reason changes)
    print(json.dumps({key: found[key] for key in ("decisions", "reversals", "final", "settled_at_s", "failed",
                                                  "holds")}))
    for line in found["actions"]:
        print(f"  {line}")
    for w in found["windows"]:
        print(f"  from {w['from_s']:6.0f}s: {w['requests']} requests, {w['attainment']:.0%} within both objectives")
    report = {"command": " ".join(["python", "-m", "bench.sim_planner", *(argv or sys.argv[1:])]), "date": date,
              "machine": machine_info(), "profile": {"name": profile.name, "source": profile.source},
              "slowdown": k, "workload": args.workload, "rate": args.rate, "slo_ms": args.slo,
              "start": args.start, "devices": args.devices, "capacity_profile": capacity_profile,
              "planner_s": {"interval": args.interval_s, "window": args.window_obs_s, "cooldown": args.cooldown_s,
                            "scale_down_delay": args.scale_down_delay_s}, **found}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
