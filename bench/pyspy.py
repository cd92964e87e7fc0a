"""Where a running process spends its CPU, by sampling (py-spy, requirements-dev.txt): a recording of one
process over a window, and its summary (the frames that own the most samples, by themselves and with
what they call). Used by benches that profile a component under load (bench.sim_scale --py-spy)."""

from __future__ import annotations

import collections
import pathlib
import shutil
import subprocess
import sys
from typing import Any


def _py_spy() -> str:
    beside = pathlib.Path(sys.executable).with_name("py-spy")  # the venv's, installed with the dev requirements
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("py-spy is not installed: pip install -r requirements-dev.txt")
    return found


def record(pid: int, seconds: float, output: pathlib.Path, rate: int = 200) -> subprocess.Popen:
    """Start sampling `pid` for `seconds` into `output` (collapsed stacks: one `frame;frame;... count` per
    line, idle threads left out); wait on the result before reading the file."""
    return subprocess.Popen([_py_spy(), "record", "--pid", str(pid), "--duration", str(max(round(seconds), 1)),
                             "--rate", str(rate), "--format", "raw", "--output", str(output), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(recording: subprocess.Popen, timeout_s: float = 60.0) -> None:
    _, err = recording.communicate(timeout=timeout_s)
    if recording.returncode != 0:
        raise RuntimeError(f"py-spy failed ({recording.returncode}): {err.strip()[-500:]}")


def _frame_name(frame: str) -> str:
    """`function (path/to/file.py:123)` → `function (file.py)`: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def summarize(output: pathlib.Path, top: int = 25) -> dict[str, Any]:
    """The samples, and the `top` functions by own samples (`self`: the innermost frame) and by
    samples anywhere on the stack (`total`: counted once per sample), each as a share of all samples."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in output.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            anywhere[name] += count

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / samples, 4)) for name, n in counter.most_common(top)] if samples else []
    return {"samples": samples, "self": shares(own), "total": shares(anywhere)}
