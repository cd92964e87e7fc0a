"""Small C kernels for the CPU hot path, compiled on first use with the system C compiler.

The shared object is cached under the Tandem cache directory, keyed by the source's hash and the
compiler flags. Without a compiler (or with TANDEM_DISABLE_C_KERNELS=1) every caller falls back
to its torch implementation: the kernels are an optimization, never a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

from common.settings import c_compiler, c_kernels_disabled, cache_dir

log = logging.getLogger(__name__)
_KERNEL_DIR = pathlib.Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]


def _build(source: pathlib.Path, target: pathlib.Path) -> None:
    compiler = shutil.which(c_compiler()) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders never see a half-written file


def load_kernel(source_name: str) -> ctypes.CDLL | None:
    """Compile (once, cached on disk) and load `engine/kernels/<source_name>`; None when C kernels are
    disabled or cannot be built here."""
    if c_kernels_disabled():
        return None
    source = _KERNEL_DIR / source_name
    digest = hashlib.sha256(source.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
    try:
        if not target.exists():
            _build(source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C kernel %s unavailable (%s); using the torch path", source_name, exc)
        return None


@functools.cache
def decode_attention_kernel() -> ctypes.CDLL | None:
    """The paged decode-attention library, or None (callers fall back to torch)."""
    lib = load_kernel("paged_decode_attention.c")
    if lib is None:
        return None
    fn = lib.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, *([ctypes.c_int] * 6), ctypes.c_float, ctypes.c_int]
    return lib


@functools.cache
def copy_ranges_kernel() -> ctypes.CDLL | None:
    """The parallel byte-range copy library, or None (callers fall back to torch copies)."""
    lib = load_kernel("copy_ranges.c")
    if lib is None:
        return None
    fn = lib.copy_ranges
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int]
    return lib
