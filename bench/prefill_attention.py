"""One layer's prefill attention through the CPU backend's three paths, in the same run: the paged C
kernel (engine/kernels/paged_attention.c, K/V read in place), torch's CPU flash kernel (K/V gathered
from the pool after a cached prefix) and the AMX tile kernel (engine/kernels/flash_prefill.c, where the
CPU grants AMX), for steps of fresh prompts and of chunks after cached prefixes, in bf16 with the
default model's attention shape (9 heads, 3 kv heads, dim 64, blocks of 16). Each path's time includes
the paged kernel storing the step's K/V, as in the engine.

    python -m bench.prefill_attention [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from bench.throughput import machine_info
from engine.attention import cpu_backend
from engine.attention.cpu_backend import CpuAttention, amx_prefill_supported
from engine.attention.metadata import AttentionShape
from engine.attention.planning import SeqSpan, attention_metadata
from engine.kv_cache import KVCachePool, KVCacheSpec

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
# (sequences, cached tokens each, new tokens each)
STEPS = [(4, 0, 512), (8, 0, 64), (8, 0, 16), (1, 2048, 2048), (4, 2000, 100), (4, 2000, 16), (8, 100, 16),
         (8, 500, 8)]


def _ms(call: Callable[[], object], repeats: int) -> float:
    call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e3


def measure(sequences: int, cached: int, new: int, repeats: int) -> dict[str, float | None]:
    shape = AttentionShape(HEADS, KV_HEADS, DIM, DIM ** -0.5)
    per_seq = -(-(cached + new) // BLOCK)
    pool = KVCachePool(KVCacheSpec(2, sequences * per_seq + 1, BLOCK, KV_HEADS, DIM, torch.bfloat16),
                       torch.device("cpu"), torch.bfloat16)
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(torch.bfloat16))
    spans = [SeqSpan(list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)), cached, new) for i in range(sequences)]
    qkv = torch.randn(sequences * new, (HEADS + 2 * KV_HEADS) * DIM).to(torch.bfloat16)
    q, k, v = qkv.split((HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM), dim=-1)
    amx = amx_prefill_supported(pool, shape)
    result: dict[str, float | None] = {}
    for name, min_queries, tiles in (("paged_c_ms", 0, False), ("torch_flash_ms", 1, False),
                                     ("amx_tiles_ms", 1, True)):
        if tiles and not amx:
            result[name] = None
            continue
        meta = attention_metadata(spans, BLOCK, pool.tensor.device, torch.bfloat16, cpu_kernel=True,
                                  dense_min_queries=min_queries, dense_max_context_per_query=0)
        attention = CpuAttention(pool, shape, meta, tiles=tiles)  # without tiles: torch's flash kernel
        result[name] = _ms(lambda run=attention: run(1, q, k, v), repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = []
    print("sequences x (cached + new)    paged C    torch flash    AMX tiles   (ms per layer)")
    for sequences, cached, new in STEPS:
        r = measure(sequences, cached, new, args.repeats)
        rows.append({"sequences": sequences, "cached": cached, "new": new, **r})
        tiles = "n/a" if r["amx_tiles_ms"] is None else f"{r['amx_tiles_ms']:9.2f}"
        print(f"  {sequences:3d} x ({cached:5d} + {new:5d})   {r['paged_c_ms']:9.2f}   {r['torch_flash_ms']:11.2f}"
              f"    {tiles}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine_info(), "shape": [HEADS, KV_HEADS, DIM, BLOCK], "rows": rows,
                       "dense_min_queries_default": cpu_backend.DENSE_PREFILL_MIN_QUERIES,
                       "amx_min_queries": cpu_backend.AMX_PREFILL_MIN_QUERIES}, f, indent=1)


if __name__ == "__main__":
    main()
