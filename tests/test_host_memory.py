"""engine.host_memory: once tuned, a freed large buffer is reused, not mapped and faulted in again. Counted as
minor page faults of a fresh process (the tuning is process-wide), so the untuned run is the control."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = r"""
import json, resource, sys, torch
if sys.argv[1] == "tuned":
    from engine.host_memory import keep_freed_buffers
    assert keep_freed_buffers()
faults = []
for step in range(12):  # growing buffers, as a step's activations grow with its batch: 20.0 .. 25.5 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty((20 << 20) + step * (512 << 10), dtype=torch.uint8)
    buffer.fill_(1)
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_activation_buffers_are_reused_once_tuned() -> None:
    pages = (20 << 20) // 4096
    untuned, tuned = _faults("plain"), _faults("tuned")
    assert sum(untuned[1:]) > 5 * pages, untuned  # the control: a fresh mapping (and its faults) for most buffers
    # tuned: the heap's pages serve later buffers (it grows by a little, and once more as a whole at most)
    assert sum(tuned[1:]) < sum(untuned[1:]) / 4 and sum(tuned[3:]) < pages, tuned
