"""Engine throughput, anchored on Hugging Face transformers `generate` run in the same invocation.

    python -m bench.throughput [--model PATH] [--batch-sizes 1 8 32 64] [--skip-hf] [--json out.json]
    python -m bench.throughput --speculative self-int4 [--batch-sizes 1 2 4 8 32 64]   (bench/speculative.py)

Measures (1) decode at several concurrencies: prefill time, decode-phase tokens/s, overall output
tokens/s; (2) prefill tokens/s on long prompts (the median of --prefill-runs prompt sets); (3) the
share of a decode step spent outside the model forward (bench/step_profile.py); (4) transformers on
the same weights, dtype and prompts; with `--quantization`, greedy agreement with the unquantized
engine. Prompts are random token ids drawn from one seeded stream, so no two runs share a prefix and
the prefix cache serves none of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from bench.bandwidth import batch1_floor
from bench.llama_anchor import run_batched_bench
from bench.step_profile import AsyncStepProfile, AsyncStepProfiler, StepProfile, StepProfiler
from engine import LLM, EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.loader.api import resolve_model_path

FIRST_ORDINARY_ID = 10  # random prompts avoid the special ids below this
AGREEMENT_QUESTIONS = (
    "What is the capital of France?", "Write a haiku about autumn.", "List three prime numbers.",
    "Explain photosynthesis in one sentence.", "What does a compiler do?", "Give me a synonym for happy.",
    "How many legs does a spider have?", "Translate 'good morning' into Spanish.",
)


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None  # None: the engine's default model
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    hf_batch_sizes: tuple[int, ...] | None = None  # None: the engine's batch sizes
    prompt_len: int = 128
    max_tokens: int = 128
    prefill_len: int = 512
    prefill_prompts: int = 8
    prefill_runs: int = 3  # prefill measured on this many prompt sets (each engine the same), the median kept
    profile_batch: int | None = 32  # None: no step profile
    skip_hf: bool = False
    quantization: str | None = None
    deterministic: bool = False
    agreement_tokens: int = 64
    seed: int = 0
    num_threads: int | None = None
    llama_batched_bench: str | None = None  # llama.cpp's llama-batched-bench binary: an extra anchor
    speculative: str | None = None  # a draft model or self-int4: the speculative comparison instead (bench/speculative)
    num_draft_tokens: int = 4
    repeats: int = 3  # with speculative: alternating runs per row
    json_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "hf_batch_sizes"):
            sizes = getattr(self, name)
            if sizes is not None and (not sizes or min(sizes) < 1):
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {sizes}")
        for name in ("prompt_len", "max_tokens", "prefill_len", "prefill_prompts", "prefill_runs", "agreement_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.profile_batch is not None and (self.profile_batch < 1 or self.max_tokens < 2):
            raise ValueError("the step profile needs profile_batch >= 1 and max_tokens >= 2 (or no profile)")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization must be int8 or int4, got {self.quantization!r}")

    @property
    def hf_sizes(self) -> tuple[int, ...]:
        return self.hf_batch_sizes or self.batch_sizes


@dataclass(frozen=True)
class DecodeRun:
    batch_size: int
    prompt_len: int
    max_tokens: int
    output_tokens: int  # counted from the engine's outputs: must be batch_size * max_tokens
    prefill_s: float  # start until every prompt has its first token
    prefill_steps: int
    prefill_phase_tokens: int  # output tokens produced in that phase (>= batch_size with chunked prefill)
    decode_s: float  # the step after that until the last token
    decode_steps: int
    decode_tokens: int
    decode_tok_s: float | None
    total_s: float
    overall_tok_s: float
    cached_prompt_tokens: int  # served by the prefix cache: 0, or the run is void


@dataclass(frozen=True)
class PrefillRun:
    num_prompts: int
    prompt_len: int
    seconds: float
    steps: int
    tok_s: float


@dataclass
class _Trace:
    step_ends: list[float] = field(default_factory=list)  # perf_counter at the end of each step
    step_tokens: list[int] = field(default_factory=list)
    prefill_steps: int = 0  # steps until every prompt had its first token
    output_tokens: int = 0
    cached_tokens: int = 0


class PromptSource:
    """Random prompts from one seeded stream: no call repeats an earlier call's prompts."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._vocab_size = vocab_size

    def take(self, count: int, length: int) -> list[list[int]]:
        ids = self._rng.integers(FIRST_ORDINARY_ID, self._vocab_size, size=(count, length))
        return [[int(t) for t in row] for row in ids]


class EngineBench:
    def __init__(self, llm: LLM | LLMEngine) -> None:
        self.engine: LLMEngine = llm.engine if isinstance(llm, LLM) else llm
        device = self.engine.parts.device
        self.sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" \
            else (lambda: None)
        self._next_id = 0

    def drive(self, prompts: Sequence[list[int]], params: SamplingParams,
              profiler: StepProfiler | AsyncStepProfiler | None = None) -> tuple[float, _Trace]:
        """Run `prompts` to completion one `step()` at a time; returns the start time and the trace."""
        ids = [f"bench-{self._next_id + i}" for i in range(len(prompts))]
        self._next_id += len(prompts)
        trace, started_ids = _Trace(), set[str]()
        self.sync()
        start = time.perf_counter()
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.engine.add_request(self.engine.make_request(request_id, prompt, params))
        while self.engine.has_unfinished_requests():
            decode_phase = len(started_ids) == len(ids)
            if profiler is not None:
                profiler.begin_step()
            step_start = time.perf_counter()
            outputs = self.engine.step()
            self.sync()
            end = time.perf_counter()
            if profiler is not None:
                profiler.end_step(end - step_start, counted=decode_phase)
            new = 0
            for out in outputs:
                new += len(out.new_token_ids)
                if out.token_ids:
                    started_ids.add(out.request_id)
                if out.finished:
                    trace.cached_tokens += out.num_cached_tokens
            trace.step_ends.append(end)
            trace.step_tokens.append(new)
            trace.output_tokens += new
            if not decode_phase:
                trace.prefill_steps += 1
        return start, trace

    def decode(self, prompts: Sequence[list[int]], max_tokens: int,
               profiler: StepProfiler | AsyncStepProfiler | None = None) -> DecodeRun:
        return self.decode_with(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                profiler)

    def decode_with(self, prompts: Sequence[list[int]], params: SamplingParams,
                    profiler: StepProfiler | AsyncStepProfiler | None = None) -> DecodeRun:
        """Decode figures of one run of `prompts` under `params`."""
        max_tokens = params.max_tokens
        start, trace = self.drive(prompts, params, profiler)
        if trace.cached_tokens:
            raise RuntimeError(f"the prefix cache served {trace.cached_tokens} prompt tokens: "
                               "measured prompts must not repeat")
        n_pre = trace.prefill_steps
        prefill_end = trace.step_ends[n_pre - 1]
        total_s = trace.step_ends[-1] - start
        decode_s = trace.step_ends[-1] - prefill_end
        decode_tokens = sum(trace.step_tokens[n_pre:])
        return DecodeRun(
            batch_size=len(prompts), prompt_len=len(prompts[0]), max_tokens=max_tokens,
            output_tokens=trace.output_tokens, prefill_s=prefill_end - start, prefill_steps=n_pre,
            prefill_phase_tokens=sum(trace.step_tokens[:n_pre]), decode_s=decode_s,
            decode_steps=len(trace.step_ends) - n_pre, decode_tokens=decode_tokens,
            decode_tok_s=decode_tokens / decode_s if decode_s > 0 else None, total_s=total_s,
            overall_tok_s=trace.output_tokens / total_s, cached_prompt_tokens=trace.cached_tokens)

    def prefill(self, prompts: Sequence[list[int]]) -> PrefillRun:
        start, trace = self.drive(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        seconds = trace.step_ends[-1] - start
        tokens = sum(len(p) for p in prompts)
        return PrefillRun(len(prompts), len(prompts[0]), seconds, len(trace.step_ends), tokens / seconds)

    def profile(self, prompts: Sequence[list[int]], max_tokens: int) -> StepProfile:
        with StepProfiler(self.engine, self.sync) as profiler:
            self.decode(prompts, max_tokens, profiler)
        return profiler.result(len(prompts))


def async_profile(engine: LLMEngine, warm: Sequence[list[int]], prompts: Sequence[list[int]],
                  max_tokens: int) -> AsyncStepProfile:
    """The same decode with async scheduling, on the same weights and pool (an engine of its own, closed after:
    its forward thread takes this thread's OpenMP team until then, so it runs last)."""
    pipelined = LLMEngine(replace(engine.config, async_scheduling=True), parts=engine.parts)
    try:
        bench = EngineBench(pipelined)
        bench.drive(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        with AsyncStepProfiler(pipelined) as profiler:
            bench.decode(prompts, max_tokens, profiler)
        return profiler.result(len(prompts))
    finally:
        pipelined.close()
        engine.reset_prefix_cache()  # the shared pool's blocks were written by another block manager


def _kv_blocks(cfg: BenchConfig, block_size: int) -> int:
    """Enough KV blocks for the largest run to hold every sequence at once (no preemption)."""
    def blocks(count: int, tokens: int) -> int:
        return count * -(-tokens // block_size)
    decode_batch = max(*cfg.batch_sizes, cfg.profile_batch or 1)
    return max(blocks(decode_batch, cfg.prompt_len + cfg.max_tokens),
               blocks(cfg.prefill_prompts, cfg.prefill_len + 1),
               blocks(3, cfg.prompt_len + 8) + blocks(1, cfg.prefill_len + 8),  # the warm-up
               blocks(len(AGREEMENT_QUESTIONS), 256 + cfg.agreement_tokens)) + 1


def _make_llm(cfg: BenchConfig, quantization: str | None) -> LLM:
    max_batch = max(*cfg.batch_sizes, cfg.profile_batch or 1)
    llm = LLM(cfg.model, quantization=quantization, seed=cfg.seed, num_threads=cfg.num_threads,
              deterministic=cfg.deterministic,
              max_num_seqs=max(EngineConfig.max_num_seqs, max_batch),
              num_kv_blocks=_kv_blocks(cfg, EngineConfig.block_size))
    longest = max(cfg.prompt_len + cfg.max_tokens, cfg.prefill_len + 1)
    if longest > llm.engine.max_model_len:
        raise SystemExit(f"runs need {longest} tokens of context but the engine holds "
                         f"{llm.engine.max_model_len}: lower --prompt-len/--max-tokens/--prefill-len")
    return llm


def _model_dtype(llm: LLM) -> torch.dtype:
    return next(p.dtype for p in llm.engine.parts.model.parameters() if p.dtype.is_floating_point)


def _greedy(llm: LLM, num_tokens: int) -> list[list[int]]:
    tok = llm.tokenizer
    prompts: list[str | list[int]] = [tok.apply_chat_template([{"role": "user", "content": q}])
                                      for q in AGREEMENT_QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params)]


def greedy_agreement(quantized: list[list[int]], reference: list[list[int]]) -> dict[str, float | int]:
    """Position-wise agreement, and the mean share of each reply before the first differing token."""
    same = sum(a == b for q, r in zip(quantized, reference, strict=True) for a, b in zip(q, r, strict=True))
    total = sum(len(r) for r in reference)
    prefixes = [next((i for i, (a, b) in enumerate(zip(q, r, strict=True)) if a != b), len(r)) / len(r)
                for q, r in zip(quantized, reference, strict=True)]
    return {"prompts": len(reference), "tokens_per_prompt": len(reference[0]),
            "token_agreement": same / total, "prefix_agreement": float(np.mean(prefixes))}


def machine_info() -> dict[str, Any]:
    cpu: str | None = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu is None:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import transformers
    return {
        "cpu_model": cpu or platform.processor() or "unknown", "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_prefill(runs: Sequence[Any]) -> dict[str, Any]:
    """The run of median time among `runs` (an odd count picks a measured run, not an average), with
    every run's seconds beside it."""
    chosen = sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]
    return {**asdict(chosen), "runs_s": [r.seconds for r in runs]}


def run_engine(cfg: BenchConfig, llm: LLM, source: PromptSource, prompts: dict[int, list[list[int]]],
               long_prompts: list[list[list[int]]]) -> dict[str, Any]:
    bench = EngineBench(llm)
    warm = source.take(3, cfg.prompt_len) + source.take(1, cfg.prefill_len)
    bench.drive(warm, SamplingParams(temperature=0, max_tokens=min(8, cfg.max_tokens), ignore_eos=True))
    parts = llm.engine.parts
    result: dict[str, Any] = {
        "device": str(parts.device), "dtype": str(_model_dtype(llm)).removeprefix("torch."),
        "kv_cache_dtype": str(parts.pool.spec.dtype).removeprefix("torch."), "quantization": cfg.quantization,
        "deterministic": cfg.deterministic,
        "quantized_layers": len(parts.quantized_layers), "load_s": parts.load_seconds,
        "num_kv_blocks": parts.pool.spec.num_blocks, "decode": []}
    for b in cfg.batch_sizes:
        _log(f"engine: decode, batch {b}")
        result["decode"].append(asdict(bench.decode(prompts[b], cfg.max_tokens)))
    _log(f"engine: prefill, {cfg.prefill_prompts} x {cfg.prefill_len} tokens, {cfg.prefill_runs} runs")
    result["prefill"] = median_prefill([bench.prefill(p) for p in long_prompts])
    result["batch1_floor"] = asdict(batch1_floor(parts.model))
    result["step_profile"] = result["async_step_profile"] = None
    if cfg.profile_batch is not None:
        _log(f"engine: step profile, batch {cfg.profile_batch}")
        profile = bench.profile(source.take(cfg.profile_batch, cfg.prompt_len), cfg.max_tokens)
        result["step_profile"] = asdict(profile)
        _log(f"engine: async-scheduling step profile, batch {cfg.profile_batch}")
        result["async_step_profile"] = asdict(async_profile(llm.engine, source.take(3, cfg.prompt_len),
                                                            source.take(cfg.profile_batch, cfg.prompt_len),
                                                            cfg.max_tokens))
    llm.engine.check_integrity()
    return result


def run_hf(cfg: BenchConfig, dtype: torch.dtype, device: torch.device, source: PromptSource,
           prompts: dict[int, list[list[int]]], long_prompts: list[list[list[int]]]) -> dict[str, Any]:
    from bench.hf_baseline import HFBaseline

    _log("transformers: loading")
    hf = HFBaseline(resolve_model_path(cfg.model), dtype, device)
    hf.warm_up(source.take(1, cfg.prompt_len)[0])
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "load_s": hf.load_s, "decode": []}
    for b in cfg.hf_sizes:
        _log(f"transformers: decode, batch {b}")
        result["decode"].append(asdict(hf.decode(prompts[b], cfg.max_tokens)))
    _log(f"transformers: prefill, {cfg.prefill_prompts} x {cfg.prefill_len} tokens, {cfg.prefill_runs} runs")
    result["prefill"] = median_prefill([hf.prefill(p) for p in long_prompts])
    return result


def run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.perf_counter()
    llm = _make_llm(cfg, cfg.quantization)
    source = PromptSource(llm.engine.model_config.vocab_size, cfg.seed)
    prompts = {b: source.take(b, cfg.prompt_len) for b in dict.fromkeys((*cfg.batch_sizes, *cfg.hf_sizes))}
    long_prompts = [source.take(cfg.prefill_prompts, cfg.prefill_len) for _ in range(cfg.prefill_runs)]
    results: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg)}
    results["engine"] = run_engine(cfg, llm, source, prompts, long_prompts)
    dtype, device = _model_dtype(llm), llm.engine.parts.device
    results["agreement"] = None
    if cfg.quantization is not None:
        _log(f"agreement: {cfg.quantization} vs unquantized, {len(AGREEMENT_QUESTIONS)} chat prompts")
        quantized = _greedy(llm, cfg.agreement_tokens)
        del llm
        gc.collect()
        llm = _make_llm(cfg, None)
        dtype = _model_dtype(llm)
        results["agreement"] = greedy_agreement(quantized, _greedy(llm, cfg.agreement_tokens))
    del llm
    gc.collect()
    results["hf"] = None if cfg.skip_hf else run_hf(cfg, dtype, device, source, prompts, long_prompts)
    results["llama_cpp"] = None
    if cfg.llama_batched_bench:
        _log("llama.cpp: llama-batched-bench")
        runs = run_batched_bench(cfg.llama_batched_bench, str(resolve_model_path(cfg.model)), cfg.batch_sizes,
                                 cfg.prompt_len, cfg.max_tokens, torch.get_num_threads())
        results["llama_cpp"] = [asdict(r) for r in runs]
    results["machine"]["torch_threads"] = torch.get_num_threads()
    results["wall_s"] = time.perf_counter() - started
    return results


def _num(x: float | None, fmt: str = "8.1f") -> str:
    return format(x, fmt) if x is not None else " " * (int(fmt.split(".")[0]) - 1) + "-"


def format_report(results: dict[str, Any]) -> str:
    m, eng, hf = results["machine"], results["engine"], results["hf"]
    lines = [f"{m['cpu_model']} ({m['usable_cores']} cores usable), torch {m['torch_version']}, "
             f"{m['torch_threads']} threads, {m['date']}",
             f"engine: {eng['device']}, {eng['dtype']}, quantization {eng['quantization']}"
             f"{', deterministic' if eng.get('deterministic') else ''}; "
             f"transformers: {hf['dtype'] if hf else 'skipped'}", "",
             "decode      batch  prefill s  decode tok/s  overall tok/s  ms/step  vs HF overall"]
    hf_by_batch = {r["batch_size"]: r for r in hf["decode"]} if hf else {}
    for r in eng["decode"]:
        ms = 1e3 * r["decode_s"] / r["decode_steps"] if r["decode_steps"] else None
        ref = hf_by_batch.get(r["batch_size"])
        ratio = f"{r['overall_tok_s'] / ref['overall_tok_s']:9.2f}x" if ref else ""
        lines.append(f"  engine   {r['batch_size']:6d}  {r['prefill_s']:9.2f}  "
                     f"{_num(r['decode_tok_s'], '12.1f')}  {r['overall_tok_s']:13.1f}  {_num(ms, '7.1f')}"
                     f"  {ratio}")
    for r in hf["decode"] if hf else []:
        lines.append(f"  hf       {r['batch_size']:6d}  {r['prefill_s']:9.2f}  "
                     f"{_num(r['decode_tok_s'], '12.1f')}  {r['overall_tok_s']:13.1f}")
    engine_by_batch = {r["batch_size"]: r for r in eng["decode"]}
    for r in results.get("llama_cpp") or []:
        ours = engine_by_batch.get(r["batch_size"])
        vs = (f"  engine/llama.cpp: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, overall "
              f"{ours['overall_tok_s'] / r['overall_tok_s']:.2f}x") if ours and ours["decode_tok_s"] else ""
        prefill_s = r["total_s"] - r["max_tokens"] * r["batch_size"] / r["decode_tok_s"]
        lines.append(f"  llama.cpp{r['batch_size']:5d}  {prefill_s:9.2f}  {r['decode_tok_s']:12.1f}  "
                     f"{r['overall_tok_s']:13.1f}{vs}")
    if (floor := eng.get("batch1_floor")) and 1 in engine_by_batch and engine_by_batch[1]["decode_steps"]:
        one = engine_by_batch[1]
        ms = 1e3 * one["decode_s"] / one["decode_steps"]
        lines.append(f"  batch 1: {ms:.1f} ms/token vs the memory floor {floor['floor_ms']:.1f} ms "
                     f"({floor['weight_bytes'] / 1e6:.0f} MB of weights per step at {floor['read_gb_s']:.1f} GB/s "
                     f"read bandwidth; copy {floor['copy_gb_s']:.1f} GB/s): {ms / floor['floor_ms']:.2f}x the floor")
    lines += ["", "prefill     prompts x len   seconds   tok/s   (median run; every run's seconds)"]
    for name, r in (("engine", eng["prefill"]), ("hf", hf["prefill"] if hf else None)):
        if r is not None:
            runs = " ".join(f"{t:.2f}" for t in r["runs_s"])
            lines.append(f"  {name:8s} {r['num_prompts']:4d} x {r['prompt_len']:<5d} {r['seconds']:8.2f}  "
                         f"{r['tok_s']:7.1f}   ({runs})")
    if (p := eng["step_profile"]) is not None:
        lines += ["", f"decode step at batch {p['batch_size']}: {p['step_ms']:.1f} ms, forward+logits "
                  f"{p['forward_ms']:.1f} ms; outside the forward {100 * p['outside_share']:.1f}% = schedule "
                  f"{100 * p['schedule_share']:.1f}% + prepare {100 * p['prepare_share']:.1f}% + sample "
                  f"{100 * p['sample_share']:.1f}% + commit/detokenize/other {100 * p['other_share']:.1f}%"]
    if (p := eng.get("async_step_profile")) is not None:
        lines += [f"with async scheduling: {p['step_ms']:.1f} ms a step, forward thread busy {p['forward_ms']:.1f} "
                  f"ms; outside the forward {100 * p['exposed_share']:.1f}%; engine thread per step: "
                  f"{p['overlapped_ms']:.2f} ms overlapping the forward, {p['waiting_ms']:.1f} ms waiting, "
                  f"{p['serial_ms']:.2f} ms serial"]
    if (a := results["agreement"]) is not None:
        lines += ["", f"greedy agreement {eng['quantization']} vs unquantized ({a['prompts']} prompts x "
                  f"{a['tokens_per_prompt']} tokens): {100 * a['token_agreement']:.1f}% of tokens, "
                  f"{100 * a['prefix_agreement']:.1f}% before the first difference"]
    lines.append(f"\nwall time {results['wall_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--hf-batch-sizes", type=int, nargs="+",
                   help="transformers batch sizes (default: --batch-sizes)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-prompts", type=int, default=8)
    p.add_argument("--prefill-runs", type=int, default=3,
                   help="prefill measured on this many prompt sets, the same for each engine (median kept)")
    p.add_argument("--profile-batch", type=int, default=32, help="batch of the step profile; 0 = none")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    p.add_argument("--quantization", choices=["int8", "int4"])
    p.add_argument("--deterministic", action="store_true", help="the engine's batch-invariant mode")
    p.add_argument("--agreement-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--llama-batched-bench", help="llama.cpp's llama-batched-bench binary: run it as an anchor")
    p.add_argument("--speculative", metavar="DRAFT", help="instead: decoding with this draft model (a path, or "
                   "self-int4) against none, greedy and temperature 0.8 (bench/speculative.py)")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="with --speculative: most drafts per step")
    p.add_argument("--repeats", type=int, default=3, help="with --speculative: alternating runs per row (median)")
    p.add_argument("--json", dest="json_path", help="write every result to this JSON file")
    a = p.parse_args(argv)
    return BenchConfig(
        model=a.model, batch_sizes=tuple(a.batch_sizes),
        hf_batch_sizes=tuple(a.hf_batch_sizes) if a.hf_batch_sizes else None, prompt_len=a.prompt_len,
        max_tokens=a.max_tokens, prefill_len=a.prefill_len, prefill_prompts=a.prefill_prompts,
        prefill_runs=a.prefill_runs, profile_batch=a.profile_batch or None, skip_hf=a.skip_hf,
        quantization=a.quantization,
        deterministic=a.deterministic,
        agreement_tokens=a.agreement_tokens, seed=a.seed, num_threads=a.num_threads,
        llama_batched_bench=a.llama_batched_bench, speculative=a.speculative,
        num_draft_tokens=a.num_draft_tokens, repeats=a.repeats, json_path=a.json_path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    if cfg.speculative is not None:
        from bench.speculative import format_speculative, run_speculative
        results = {"machine": machine_info(), "config": asdict(cfg),
                   "speculative": run_speculative(cfg.model, cfg.speculative, cfg.batch_sizes, cfg.max_tokens,
                                                  cfg.num_draft_tokens, cfg.seed, cfg.num_threads, cfg.repeats)}
        results["machine"]["torch_threads"] = torch.get_num_threads()
        print(format_speculative(results["speculative"]), flush=True)
    else:
        results = run(cfg)
        print(format_report(results), flush=True)
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
