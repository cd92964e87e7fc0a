"""Children started with `common.processes.spawn` die with the process that started them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_spawned_child_dies_when_its_parent_exits() -> None:
    parent = subprocess.run(
        [sys.executable, "-c", "from common.processes import spawn; print(spawn(['sleep', '60']).pid)"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    pid = int(parent.stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init once it is a zombie; waitpid fails: not our child
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError(f"child {pid} outlived its parent")
