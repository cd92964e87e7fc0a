"""Small C kernels for the CPU hot path, compiled on first use with the system C compiler.

The shared object is cached under the Tandem cache directory, keyed by the sources' hash, the
compiler (path and version), its flags, and this machine's architecture and CPU feature flags
(`-march=native` code must never run on another CPU). Without a compiler (or with
TANDEM_DISABLE_C_KERNELS=1) every caller falls back to its torch implementation: the kernels are an
optimization, never a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

from common.settings import c_compiler, c_kernels_disabled, cache_dir

log = logging.getLogger(__name__)
_KERNEL_DIR = pathlib.Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11",
          f"-I{_KERNEL_DIR}"]
_P, _I32, _I64, _F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# the element types the kernels take for activations and KV rows: vec.h's DT_F32 / DT_BF16
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _cpu_flags() -> str:
    """The machine and its CPU feature list (x86 `flags`, Arm `Features`): what -march=native targets."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    features = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {features}"


@functools.cache
def _compiler() -> tuple[str, str]:
    """The C compiler's path and its `--version` (a different compiler must not reuse a cached object)."""
    compiler = shutil.which(c_compiler()) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"C compiler {compiler} does not run: {exc}") from exc
    return compiler, version


def _build(source: pathlib.Path, target: pathlib.Path, flags: list[str]) -> None:
    compiler, _ = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders never see a half-written file


def load_kernel(source_name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Compile (once, cached on disk) and load `engine/kernels/<source_name>`, with `-D` for each of
    `defines`; None when C kernels are disabled or cannot be built here."""
    if c_kernels_disabled():
        return None
    source = _KERNEL_DIR / source_name
    flags = [*_FLAGS, *(f"-D{name}" for name in defines)]
    try:
        key = source.read_bytes() + (_KERNEL_DIR / "vec.h").read_bytes() + " ".join(flags).encode()
        digest = hashlib.sha256(key + _cpu_flags().encode() + "\n".join(_compiler()).encode()).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"{source.stem}-{digest}.so"
        if not target.exists():
            _build(source, target, flags)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C kernel %s unavailable (%s); using the torch path", source_name, exc)
        return None


def _load_bound(source_name: str, signatures: dict[str, tuple[type | None, ...]],
                defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`load_kernel(source_name, defines)` with each function's (restype, *argtypes) set, or None."""
    lib = load_kernel(source_name, defines)
    if lib is not None:
        for name, (restype, *argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
    return lib


@functools.cache
def attention_kernel() -> ctypes.CDLL | None:
    """The paged attention library (paged_attention.c), or None (callers fall back to torch)."""
    return _load_bound("paged_attention.c", {
        "paged_attention": (_I32, _P, _I64, _I32, _I64, _P, _P, _I32, _P, _I32, _P, _P, _P, _P, _I32, _P,
                            _I32, _I32, _I32, _I32, _F32, _I32, _F32, _I32)})


@functools.cache
def flash_prefill_kernel(portable: bool = False) -> ctypes.CDLL | None:
    """Prefill attention in bf16 on AMX tiles over the KV pool (flash_prefill.c), or None. Where the CPU
    has no AMX its tile operations run as plain C, slowly (the engine calls it only where
    `flash_prefill_uses_amx()` says 1); `portable` (tests) builds every step as plain C."""
    return _load_bound("flash_prefill.c", {
        "flash_prefill": (_I32, _P, _I64, _P, _P, _P, _P, _I32, _P, _P, _I32, _I32, _P, _I64, _I32, _I32, _I32, _F32,
                          _I32, _P, _I32),
        "flash_prefill_scratch": (_I64, _P, _P, _I32, _I32, _I32, _I32),
        "flash_prefill_uses_amx": (_I32,)}, ("TANDEM_PORTABLE_C",) if portable else ())


@functools.cache
def fused_ops_kernel() -> ctypes.CDLL | None:
    """RMSNorm, SiLU-and-multiply, RoPE and row argmax (fused_ops.c), or None (callers use torch)."""
    return _load_bound("fused_ops.c", {
        "rms_norm": (None, _P, _P, _P, _P, _I64, _I32, _F32, _I32, _I32),
        "rms_norm_fp32_weight": (None, _P, _P, _P, _P, _I64, _I32, _F32, _I32, _I32),
        "silu_mul": (None, _P, _P, _I64, _I32, _I32, _I32),
        "rope": (None, _P, _I64, _I64, _I32, _I32, _I32, _P, _P, _P, _I32, _I32),
        "argmax_rows": (None, _P, _P, _I64, _I32, _I32, _I32)})


@functools.cache
def quant_matmul_kernel() -> ctypes.CDLL | None:
    """int4 / int8 weights x int8-rounded activations (quant_matmul.c), or None (callers use torch)."""
    return _load_bound("quant_matmul.c", {
        "int4_linear": (_I32, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32),
        "int8_linear": (_I32, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32),
        "int4_dequantize": (None, _P, _P, _P, _P, _I32, _I32, _I32, _I32)})


@functools.cache
def gemv_kernel() -> ctypes.CDLL | None:
    """One fp32 or bf16 row (or a few) times a row-major weight of its dtype (gemv.c), or None (callers use torch)."""
    return _load_bound("gemv.c", {"f32_gemv": (None, _P, _P, _P, _P, _I32, _I32, _I32),
                                  "bf16_gemv": (None, _P, _P, _P, _P, _I32, _I32, _I32),
                                  "f32_gemm_few": (None, _P, _P, _P, _P, _I32, _I32, _I32, _I32),
                                  "bf16_gemm_few": (None, _P, _P, _P, _P, _I32, _I32, _I32, _I32)})


@functools.cache
def step_program_kernel() -> ctypes.CDLL | None:
    """The one-token step runner (step_program.c), or None (the runner steps eagerly)."""
    return _load_bound("step_program.c", {"run_step": (_I32, _P, _P, _P, _I32)})


@functools.cache
def copy_ranges_kernel() -> ctypes.CDLL | None:
    """The parallel byte-range copy library, or None (callers fall back to torch copies)."""
    return _load_bound("copy_ranges.c", {"copy_ranges": (None, _P, _P, _P, _P, _P, _I64, _I32)})


@functools.cache
def token_mask_kernel() -> ctypes.CDLL | None:
    """Structured-output bitmasks applied to fp32 logits (token_mask.c), or None (callers use torch)."""
    return _load_bound("token_mask.c", {"apply_token_bitmask": (None, _P, _I64, _P, _P, _I64, _I64, _I64)})


@functools.cache
def shm_sync_kernel() -> ctypes.CDLL | None:
    """Counters in shared memory for tensor-parallel ranks on one host (shm_sync.c), or None (they use Gloo)."""
    return _load_bound("shm_sync.c", {"shm_publish": (None, _P, _I64), "shm_set": (None, _P, _I64),
                                      "shm_wait": (_I32, _P, _I32, _I32, _I64, _P, _P, _I32, _I32, ctypes.c_double)})
