"""engine.openmp: the thread that built the model gives its OpenMP team back, so the engine thread's team is
the process's only one (a second team on a small machine makes libgomp stop spinning: see engine.openmp).
Counted as threads of a fresh process, since a team's threads are real threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, os, threading, time, torch
from engine import openmp

def threads():
    return len(os.listdir("/proc/self/task"))

def settled_threads(expected):
    # a finished thread's team winds down after its join returns: wait (bounded) for the count to settle
    deadline = time.monotonic() + 5.0
    while threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()

def parallel_op():
    x = torch.ones(4_000_000)
    for _ in range(5):
        x.mul_(1.0001)  # large enough that torch splits it over its OpenMP threads

torch.set_num_threads(2)
base = threads()
parallel_op()
with_team = threads()
handed = openmp.hand_over()
after_hand_over = threads()
parallel_op()
single = threads()
single_count = torch.get_num_threads()

seen = []
def engine_thread():
    parallel_op()
    seen.append(torch.get_num_threads())
worker = threading.Thread(target=engine_thread)
worker.start(); worker.join()
openmp.take_back(handed)
parallel_op()
print(json.dumps(dict(base=base, with_team=with_team, after_hand_over=after_hand_over, single=single,
                      single_count=single_count, other_thread_count=seen[0], restored=settled_threads(base + 1),
                      restored_count=torch.get_num_threads())))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="an OpenMP team needs two CPUs")
def test_hand_over_frees_the_team_and_keeps_the_thread_single_until_taken_back() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["with_team"] == seen["base"] + 1  # the main thread's team: one more thread
    assert seen["after_hand_over"] == seen["base"]  # given back
    assert seen["single"] == seen["base"] and seen["single_count"] == 1  # no new team on this thread
    assert seen["other_thread_count"] == 2  # other threads keep torch's thread count
    assert seen["restored_count"] == 2 and seen["restored"] == seen["base"] + 1  # taken back: a team again
