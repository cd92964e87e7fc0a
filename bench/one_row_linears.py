"""Batch-1 linears: Tandem's C matrix-vector kernel (engine/kernels/gemv.c) against oneDNN's packed
weight (the many-row path) and MKL's `mm(x, W^T)` (the previous one-row path), over the default
model's linear shapes (30 layers of qkv, o, gate/up, down, and the vocabulary-wide lm_head), weights
cold as in a decode step, in fp32 or bf16.

    python -m bench.one_row_linears [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from bench.bandwidth import read_bandwidth
from bench.throughput import machine_info
from engine.loader.packing import PackedLinear, onednn_packs

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # (out, in)


def _ms_per_step(layers: list[PackedLinear], inputs: dict[int, torch.Tensor], repeats: int = 10) -> float:
    def step() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def _ms_with(layers: list[PackedLinear], inputs: dict[int, torch.Tensor], path: str) -> float:
    """Per step through `path`: "c" (the kernel), "onednn" (the packed weight), "mkl" (mm over W^T)."""
    saved = [(layer.gemv, layer.one_row) for layer in layers]
    for layer in layers:
        if path == "onednn":
            layer.one_row = None
        elif path == "mkl":
            layer.gemv, layer.one_row = None, layer.one_row.t().contiguous()
    try:
        return _ms_per_step(layers, inputs)
    finally:
        for layer, (gemv, one_row) in zip(layers, saved, strict=True):
            layer.gemv, layer.one_row = gemv, one_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not onednn_packs(dtype):
        raise SystemExit(f"oneDNN cannot pack {args.dtype} weights on this CPU: no packed linears to compare")
    torch.manual_seed(0)
    layers = [PackedLinear(nn.Linear(k, n, bias=False).to(dtype), single_row=True) for n, k in SHAPES]
    if any(layer.gemv is None for layer in layers):
        raise SystemExit("the C gemv kernel is unavailable here (no C compiler?)")
    inputs = {k: torch.randn(1, k).to(dtype) for _, k in SHAPES}
    weight_bytes = sum(n * k * dtype.itemsize for n, k in SHAPES)
    times = {path: _ms_with(layers, inputs, path) for path in ("c", "onednn", "mkl")}
    result = {"machine": machine_info(), "dtype": args.dtype, "weight_bytes": weight_bytes,
              "read_gb_s": read_bandwidth(), "c_gemv_ms": times["c"], "onednn_ms": times["onednn"],
              "mkl_mm_ms": times["mkl"], **{f"{path}_gb_s": weight_bytes / ms / 1e6 for path, ms in times.items()}}
    print(f"{weight_bytes / 1e6:.0f} MB of {args.dtype} weights per step, "
          f"read bandwidth {result['read_gb_s']:.1f} GB/s")
    for path, label in (("c", "C gemv"), ("onednn", "oneDNN packed"), ("mkl", "MKL mm(x, W^T)")):
        print(f"{label + ':':16} {times[path]:6.1f} ms ({result[path + '_gb_s']:.1f} GB/s)   "
              f"C / this {times['c'] / times[path]:.2f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
