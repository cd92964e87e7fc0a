"""llama.cpp as an optional anchor: `llama-batched-bench` on the same GGUF, the same prompt and
output lengths and the same thread count, in the same run. Its decode figure is text-generation
tokens over generation time (`S_TG`); its overall figure is all generated tokens over the whole
time (`S`, prompt processing included), the same split bench.throughput reports for the engine.

Build the binary as bench/compare_llama_server.sh describes (pick the GGML_* flags from lscpu);
it is a benchmark tool, never a test dependency."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaRun:
    batch_size: int
    prompt_len: int
    max_tokens: int
    prefill_tok_s: float  # S_PP: prompt tokens / prompt time
    decode_tok_s: float  # S_TG: generated tokens / generation time
    overall_tok_s: float  # generated tokens / (prompt + generation time)
    total_s: float


def run_batched_bench(binary: str, gguf: str, batch_sizes: Sequence[int], prompt_len: int, max_tokens: int,
                      threads: int, timeout_s: float = 3600.0) -> list[LlamaRun]:
    ctx = max(batch_sizes) * (prompt_len + max_tokens) + 16
    cmd = [binary, "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt_len),
           "-ntg", str(max_tokens), "-npl", ",".join(str(b) for b in batch_sizes), "-t", str(threads),
           "-tb", str(threads), "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    runs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        total_s, generated = float(row["t"]), int(row["tg"]) * int(row["pl"])
        runs.append(LlamaRun(int(row["pl"]), int(row["pp"]), int(row["tg"]), float(row["speed_pp"]),
                             float(row["speed_tg"]), generated / total_s, total_s))
    if not runs:
        raise RuntimeError(f"llama-batched-bench printed no results: {proc.stdout[-2000:]}")
    return runs
