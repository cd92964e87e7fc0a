"""Calibration: a simulated worker with a profile measured on this machine, in this run
(`python -m bench.sim_profile` on the default model), predicts the real worker's TTFT, TPOT and decode
throughput on the same workload within CALIBRATION_ERROR. The workload, through the real router: a burst of
requests sent at once (chunked prefill, then a full decode batch) and a Poisson stream (prefill chunks
beside decode rows)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from bench.serve.metrics import SLO, summarize
from bench.serve.runner import RunSpec, run
from bench.serve.workloads import Session, Turn
from tests.support.cluster import REPO, tandem_up

# bounds on |simulated / real - 1|. TTFT's is wider: prefill steps of the real worker ran 1.1-1.5x their
# isolated time while it served (its gRPC thread, the router and the clients contend for the GIL and the
# second core; a simulated worker sleeps through its steps), so the simulation is optimistic there:
# -1% .. -26% in 13 runs on an AMX Xeon (docs/BENCHMARKS.md); TPOT and throughput stayed within 25%
CALIBRATION_ERROR = {"ttft_ms": 0.35, "tpot_ms": 0.25, "output_tokens_per_s": 0.25}
# the worker computes on one core, the router and the clients share the other: as on a machine of its own
# (on two, its OpenMP team stalls whenever the router or a client takes a core: decode steps ran ~1.2x
# the profile's, and the simulated worker, idle while it waits, has no such cost)
THREADS = "1"
ONE_WORKER = ("--both", "1", "--prefill", "0", "--decode", "0", "--kv-backends", "tcp", "--num-threads", THREADS)
NO_SLO = SLO(1e9, 1e9)


def _workload(count: int, seed: int) -> list[Session]:
    rng = random.Random(seed)
    return [Session((Turn(rng.randint(24, 48), tuple(rng.randrange(100, 49000) for _ in range(rng.randint(32, 400)))),))
            for _ in range(count)]


async def _serve(*up: str) -> dict[str, dict[str, float]]:
    """Mean TTFT (ms), mean TPOT (ms) and output tokens/s of each phase, on a cluster `tandem up *up`."""
    phases = {"burst": (_workload(16, 1), float("inf")), "stream": (_workload(24, 2), 6.0)}
    found: dict[str, dict[str, float]] = {}
    with tandem_up(*ONE_WORKER, *up) as cluster:
        await run(_workload(4, 0), RunSpec("grpc", cluster.grpc_address, float("inf"), progress=False))  # warm-up
        for name, (sessions, rate) in phases.items():
            results, elapsed = await run(sessions, RunSpec("grpc", cluster.grpc_address, rate, seed=3,
                                                           concurrency=64, progress=False))
            s = summarize(results, elapsed, NO_SLO)
            assert s["failed"] == 0, s["errors"]
            found[name] = {"ttft_ms": s["ttft_ms"]["mean"], "tpot_ms": s["tpot_ms"]["mean"],
                           "output_tokens_per_s": s["output_tokens_per_s"]}
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_simulated_worker_predicts_the_real_one_on_this_machine(tmp_path) -> None:
    profile = tmp_path / "profile.json"
    subprocess.run([sys.executable, "-m", "bench.sim_profile", "--prefill-tokens", "32", "128", "512", "2048",
                    "--decode-batches", "1", "4", "16", "--repeats", "3", "--long-context", "512",
                    "--num-threads", THREADS, "--output", str(profile)], cwd=REPO, check=True, timeout=300)
    real = await _serve()
    simulated = await _serve("--simulate", str(profile))
    errors = {(phase, key): simulated[phase][key] / real[phase][key] - 1 for phase in real for key in real[phase]}
    print(json.dumps({"real": real, "simulated": simulated, "errors": {f"{p} {k}": e for (p, k), e in errors.items()}}))
    assert all(abs(e) <= CALIBRATION_ERROR[key] for (_, key), e in errors.items()), (errors, real, simulated)
