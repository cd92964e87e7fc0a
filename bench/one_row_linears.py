"""Batch-1 linears: Tandem's C matrix-vector kernel (engine/kernels/gemv.c) against MKL's
`mm(x, W^T)` (the previous one-row path), over the default model's linear shapes (30 layers of
qkv, o, gate/up, down, and the vocabulary-wide lm_head), weights cold as in a decode step.

    python -m bench.one_row_linears [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from bench.bandwidth import read_bandwidth
from bench.throughput import machine_info
from engine.loader.packing import PackedLinear

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [PackedLinear(nn.Linear(k, n, bias=False), single_row=True) for n, k in SHAPES]
    if any(layer.gemv is None for layer in layers):
        raise SystemExit("the C gemv kernel is unavailable here (no C compiler?)")
    inputs = {k: torch.randn(1, k) for _, k in SHAPES}
    weight_bytes = sum(n * k * 4 for n, k in SHAPES)
    c_ms = _ms_per_step(layers, inputs)
    for layer in layers:  # the previous path: MKL's mm over a transposed copy
        layer.gemv, layer.one_row = None, layer.one_row.t().contiguous()
    mkl_ms = _ms_per_step(layers, inputs)
    result = {"machine": machine_info(), "weight_bytes": weight_bytes, "read_gb_s": read_bandwidth(),
              "c_gemv_ms": c_ms, "mkl_mm_ms": mkl_ms, "c_gemv_gb_s": weight_bytes / c_ms / 1e6,
              "mkl_mm_gb_s": weight_bytes / mkl_ms / 1e6}
    print(f"{weight_bytes / 1e6:.0f} MB of fp32 weights per step, read bandwidth {result['read_gb_s']:.1f} GB/s")
    print(f"C gemv:          {c_ms:6.1f} ms ({result['c_gemv_gb_s']:.1f} GB/s)")
    print(f"MKL mm(x, W^T):  {mkl_ms:6.1f} ms ({result['mkl_mm_gb_s']:.1f} GB/s)   C / MKL time {c_ms / mkl_ms:.2f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
