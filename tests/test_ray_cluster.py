"""Tandem on Ray (cluster/ray_backend): a two-node Ray cluster in a loopback-only namespace, node P
with the custom resources prefill and router, node D with decode. tests/support/ray_scenario.py runs there
and reports; this test checks the report:

- set up wrong (a missing model, GPUs asked of a CPU cluster), `tandem up --ray` exits 1 with the cause;
- `tandem up --ray --planner true`: prefill actors land on P, decode actors on D, the router on P (its resource);
  greedy outputs equal the engine alone;
- under continuous load, a decode actor's process SIGKILLed is restarted by Ray (new pid, same
  actor, on D) and the prefill actor killed for good is replaced by a new actor (on P): every
  request of the load succeeds with the engine's output; pools are clean after; the planner
  (bounds holding 1 prefill, 2 decode) reads the pools' sizes from the fleet;
- the fleet as the planner's actuator: decode 1 → 2 adds a worker the router uses, 2 → 1 drains
  the newest while streams run on it: they finish exactly, without migration, and the actor ends;
- then, on the same Ray cluster, `tandem up --ray --kv-store 1` (tests/support/ray_kv_store_scenario.py):
  the store actor is announced with its node and actor name and serves (its Stats: its id, the
  blocks a prompt's prefill put there), comes back empty under a new pid when its process is
  SIGKILLed and is filled again, outputs stay exact, and it is drained after the workers.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest

from tests.support.cluster import REPO
from tests.support.cluster_workload import Job, reference, workload
from tests.support.ray_kv_store_scenario import KV_STORE_GIB

pytestmark = pytest.mark.slow
KV_BLOCK_TOKENS = 16


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -n -p (root): Ray must not bind a routed address")
def test_tandem_on_ray_places_restarts_replaces_and_scales(tiny_llama_dir, tmp_path) -> None:
    jobs = workload(12, seed=3)
    streams = [Job("ids", ids=tuple((13 * i + 5 * s) % 400 + 5 for i in range(12 + s)), max_tokens=150)
               for s in range(4)]
    rng = random.Random(5)  # two prompts of 10 full blocks for the KV store
    kv_jobs = [Job("ids", ids=tuple(rng.randrange(4, 512) for _ in range(10 * KV_BLOCK_TOKENS)), max_tokens=4)
               for _ in range(2)]
    spec = {"jobs": [asdict(j) for j in jobs], "expected": [asdict(e) for e in reference(str(tiny_llama_dir), jobs)],
            "streams": [asdict(s) for s in streams],
            "streams_expected": [asdict(e) for e in reference(str(tiny_llama_dir), streams)],
            "kv_jobs": [asdict(j) for j in kv_jobs],
            "kv_expected": [asdict(e) for e in reference(str(tiny_llama_dir), kv_jobs)]}
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    report_path, kv_report_path = tmp_path / "report.json", tmp_path / "kv_report.json"
    args = f"--model {tiny_llama_dir} --jobs {tmp_path / 'jobs.json'}"
    # the KV store phase runs on the Ray cluster the scenario leaves running (the namespace ends it)
    inner = (f"ip link set lo up && {sys.executable} -m tests.support.ray_scenario {args} --out {report_path}; "
             f"{sys.executable} -m tests.support.ray_kv_store_scenario {args} --out {kv_report_path}")
    proc = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "bash", "-c", inner], cwd=REPO,
                          timeout=840, capture_output=True, text=True)
    assert report_path.exists(), f"no report (exit {proc.returncode}): {proc.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    assert "error" not in report, report["error"] + proc.stderr[-4000:]
    _check_errors(report["errors"])
    _check_tandem_up(report["a"], expected_jobs=len(jobs))
    _check_actuator(report["b"])
    assert kv_report_path.exists(), f"no KV store report (exit {proc.returncode}): {proc.stderr[-4000:]}"
    kv_report = json.loads(kv_report_path.read_text())
    assert "error" not in kv_report, kv_report["error"] + proc.stderr[-4000:]
    _check_kv_store(kv_report)


def _node_with(nodes: dict[str, dict[str, float]], resource: str) -> str:
    [node] = [n for n, resources in nodes.items() if resources.get(resource, 0) >= 1]
    return node


def _check_errors(errors: dict) -> None:
    bad_model, no_gpus = errors["bad_model"], errors["no_gpus"]
    assert bad_model["rc"] == 1 and any("failed to start" in line and "/nonexistent/model" in line
                                        for line in bad_model["said"]), bad_model
    assert no_gpus["rc"] == 1 and no_gpus["said"] == ["tandem up: --ray-placement gpus: the Ray cluster has no GPU"]
    assert bad_model["seconds"] < 60 and no_gpus["seconds"] < 60


def _check_tandem_up(a: dict, expected_jobs: int) -> None:
    p_node, d_node = _node_with(a["nodes"], "prefill"), _node_with(a["nodes"], "decode")
    roles = sorted((w["role"], w["node"]) for w in a["placement"])
    assert roles == [("decode", d_node), ("decode", d_node), ("prefill", p_node)], a["placement"]
    assert a["router_node"] == _node_with(a["nodes"], "router") == p_node
    assert len(a["equal"]) == expected_jobs and all(a["equal"]), a["equal"]

    restart = a["restart"]
    assert restart["new"]["actor"] == restart["old"]["actor"]  # the same actor, restarted by Ray
    assert restart["new"]["pid"] != restart["old"]["pid"] and restart["new"]["node"] == d_node
    assert restart["new"]["worker_id"] != restart["old"]["worker_id"]
    assert a["restarted_worker_tokens"] > 0, "the restarted decode worker took no part in the load"
    replace = a["replace"]
    assert replace["new"]["actor"] != replace["old"]["actor"]  # a new actor in place of the dead one
    assert replace["new"]["node"] == p_node

    load = a["load"]
    failed = [o for o in load if not o["ok"]]
    assert len(load) >= 10 and not failed, failed[:5]
    assert all(o["equal"] for o in load), [o for o in load if not o["equal"]][:5]
    assert all(p["integrity_ok"] and p["idle"] for p in a["pools"]), a["pools"]
    assert len(a["pools"]) == 3
    assert a["planner"] == {"current_replicas/prefill": 1, "current_replicas/decode": 2,
                            "desired_replicas/prefill": 1, "desired_replicas/decode": 2,
                            "decisions/decode": a["planner"]["decisions/decode"]}
    assert a["planner"]["decisions/decode"] >= 5  # it ran through the kills, scaling nothing beyond its bounds


def _check_actuator(b: dict) -> None:
    assert b["replicas_after_up"] == 2 and b["replicas_after_down"] == 1
    assert all(c < 150 for c in b["cut_at"]), f"streams finished before the drain: {b['cut_at']}"
    assert b["drained_running"] >= 1, "no stream ran on the drained worker"
    assert b["streams"] == ["ok"] * 4 and all(b["equal"]), b
    assert b["migrations"] == 0  # drained, not lost: the streams finished where they ran
    assert b["drained_actor"] == "dead" and b["workers_after_down"] == 2


def _check_kv_store(kv: dict) -> None:
    store, restarted = kv["store"], kv["restarted"]
    assert store["actor"] == restarted["actor"] == "kvstore-0" and store["node"] in kv["nodes"], kv
    stats = kv["stats"]
    assert stats["store_id"] == store["store_id"] and not stats["integrity_error"], stats
    assert stats["capacity_blocks"] == int(KV_STORE_GIB * (1 << 30)) // stats["block_bytes"] > 0, stats
    assert stats["readable_blocks"] >= 10, stats  # the first prompt's prefill put its blocks there
    # SIGKILLed: the same actor, restarted by Ray (a new pid and store), empty; then filled again
    assert restarted["pid"] != store["pid"] and restarted["node"] in kv["nodes"], kv
    assert kv["restarted_at_start"]["store_id"] == restarted["store_id"], kv
    assert kv["restarted_at_start"]["readable_blocks"] == 0, kv
    assert kv["restarted_stats"]["readable_blocks"] >= 10 and not kv["restarted_stats"]["integrity_error"], kv
    assert kv["equal"] == [True, True], kv
    # stopped: the router drained first, the workers next, the store last, and cleanly
    drained = [line.rsplit("draining actor ", 1)[1] for line in kv["driver_log"] if "draining actor " in line]
    assert drained == ["router-1", "prefill-2", "decode-3", "kvstore-0"], kv["driver_log"]
    assert any(line.endswith("actor kvstore-0 drained and stopped") for line in kv["driver_log"]), kv["driver_log"]
