"""Child processes that die with their parent (tests, benchmarks, the local launcher)."""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for subprocess.Popen: the kernel SIGKILLs the child when its parent thread exits."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(cmd: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start `cmd` so that the kernel SIGKILLs it when the calling thread exits.

    Prefers util-linux `setpriv --pdeathsig KILL` (the death signal survives its exec): then Popen
    needs no `preexec_fn` and can spawn without running Python code in a forked copy of this
    process, which is unsafe once gRPC (etcd client) threads exist here. Falls back to
    `preexec_fn=die_with_parent` where setpriv is missing.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *cmd], **popen_kwargs)
    return subprocess.Popen(cmd, preexec_fn=die_with_parent, **popen_kwargs)


def stop(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM `proc` (if still running) and wait up to `timeout_s` for it; SIGKILL after that.
    Returns its exit code (negative: the signal that ended it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
