"""One GPU's figures for the CUDA path, as one JSON file (scripts/gpu_check.sh runs it after the GPU tests):

- greedy agreement with transformers on the same GPU, prompt by prompt: fp32 (expected: every token), bf16 and an
  fp8 KV cache (a stated share of prompts, since rounding flips near-ties), each with the attention backend and
  CUDA graphs the engine chose;
- CUDA graphs on and off: the same tokens;
- `bench.throughput` at batch 1/8/32/64 against transformers `generate` on the same GPU, in the same run;
- the GPU tests' outcome (pytest's JUnit files), merged in by `--merge`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (imported where used: `merge` and `junit_summary` run without torch)
    from engine import LLM

_TEXTS = ("The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
          "Explain why the sky is blue in two sentences.", "1, 2, 3, 5, 8, 13,",
          "Translate to German: the cat sleeps on the warm windowsill while rain falls outside.",
          "List three uses of copper.", "Once upon a time, in a village by the mountains, there lived")


def _prompts(llm: LLM, count: int) -> list[list[int]]:
    """`count` prompts of varied lengths (the texts, then the texts repeated into longer ones)."""
    base = [llm.tokenizer.encode(text) for text in _TEXTS]
    return [base[i % len(base)] * (1 + i // len(base) * 7) for i in range(count)]


def engine_tokens(model: str, dtype: str, eager: bool, prompts: Sequence[Sequence[int]] | None, count: int,
                  max_tokens: int, kv_cache_dtype: str = "auto") -> tuple[list[list[int]], list[list[int]], dict]:
    """Greedy continuations, each ending at its first EOS (kept) or after `max_tokens`."""
    from engine import LLM, SamplingParams

    llm = LLM(model, device="cuda", dtype=dtype, enforce_eager=eager, kv_cache_dtype=kv_cache_dtype,
              max_num_seqs=64)
    runner = llm.engine.runner
    chosen = list(prompts) if prompts is not None else _prompts(llm, count)
    started = time.perf_counter()
    outs = llm.generate(chosen, SamplingParams(temperature=0, max_tokens=max_tokens))
    info = {"dtype": dtype, "kv_cache_dtype": kv_cache_dtype, "triton_attention": runner.use_triton,
            "cuda_graphs": runner.graphs is not None, "seconds": time.perf_counter() - started}
    llm.engine.close()
    return [list(p) for p in chosen], [o.token_ids for o in outs], info


def hf_tokens(model: str, dtype: str, prompts: Sequence[Sequence[int]], max_tokens: int,
              eos_ids: Sequence[int]) -> list[list[int]]:
    """transformers' greedy `generate` on the same GPU, one prompt at a time (no padding in the way), each ending
    at its first EOS (kept), as the engine's."""
    import torch

    from bench.hf_baseline import HFBaseline
    from engine.loader.api import resolve_model_path

    hf = HFBaseline(resolve_model_path(model), getattr(torch, dtype), torch.device("cuda"))
    tokens = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], device="cuda")
            out = hf.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    num_beams=1, max_new_tokens=max_tokens, eos_token_id=list(eos_ids),
                                    pad_token_id=hf.pad_id, temperature=None, top_p=None, top_k=None)
            new = out[0, ids.shape[1]:].tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
            tokens.append(new[:end])
    del hf
    torch.cuda.empty_cache()
    return tokens


def compare(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]]) -> dict[str, Any]:
    """How many prompts agree whole, and where each other one first diverges."""
    divergences = [next((i for i, (g, w) in enumerate(zip(a, b, strict=False)) if g != w),
                        None if len(a) == len(b) else min(len(a), len(b)))
                   for a, b in zip(got, want, strict=True)]
    return {"prompts": len(got), "equal": sum(d is None for d in divergences),
            "first_divergence": [d for d in divergences if d is not None]}


def junit_summary(path: str) -> dict[str, Any]:
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{path} holds no test suite"
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("skipped") is not None]
    return {"tests": len(cases), "failed": failed, "skipped": skipped, "seconds": float(suite.get("time", 0))}


def run(model: str | None, count: int, max_tokens: int, batch_sizes: Sequence[int]) -> dict:
    import torch

    from bench import throughput
    from engine.loader.api import load_tokenizer, resolve_model_path

    path = str(resolve_model_path(model))
    eos = tuple(load_tokenizer(path).eos_token_ids)
    results: dict[str, Any] = {"machine": throughput.machine_info(), "model": path,
                               "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    prompts, fp32, info = engine_tokens(path, "float32", False, None, count, max_tokens)
    results["fp32_vs_transformers"] = {**info, **compare(fp32, hf_tokens(path, "float32", prompts, max_tokens, eos))}
    _, bf16, info = engine_tokens(path, "bfloat16", False, prompts, count, max_tokens)
    results["bf16_vs_transformers"] = {**info,
                                       **compare(bf16, hf_tokens(path, "bfloat16", prompts, max_tokens, eos))}
    _, bf16_eager, info = engine_tokens(path, "bfloat16", True, prompts, count, max_tokens)
    results["bf16_graphs_vs_eager"] = {**info, **compare(bf16, bf16_eager)}
    _, fp8, info = engine_tokens(path, "bfloat16", False, prompts, count, max_tokens, kv_cache_dtype="fp8_e4m3")
    results["fp8_cache_vs_bf16_cache"] = {**info, **compare(fp8, bf16)}
    results["throughput"] = throughput.main(["--batch-sizes", *map(str, batch_sizes), "--max-tokens", "64",
                                             "--prefill-runs", "2", "--profile-batch", "0"]
                                            + (["--model", model] if model else []))
    return results


def merge(work: pathlib.Path, exit_codes: dict[str, int], seconds: float) -> dict[str, Any]:
    """The one report: the figures (if the benchmark got that far), each test run's JUnit summary, exit codes."""
    figures = work / "figures.json"
    report: dict[str, Any] = {"exit_codes": exit_codes, "seconds": seconds,
                              **(json.loads(figures.read_text()) if figures.exists() else {})}
    for name in ("gpu_tests", "triton_tests"):
        junit = work / f"{name}.xml"
        report[name] = junit_summary(str(junit)) if junit.exists() else None  # None: killed before it wrote one
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--json", dest="json_path", required=True, help="write every figure here")
    p.add_argument("--merge", metavar="WORK", help="instead: merge WORK's figures.json and JUnit files into --json")
    p.add_argument("--exit-codes", default="", help="with --merge: name=code,... of the steps")
    p.add_argument("--seconds", type=float, default=0.0, help="with --merge: the whole check's seconds")
    a = p.parse_args(argv)
    if a.merge:
        codes = {k: int(v) for k, v in (item.split("=") for item in a.exit_codes.split(",") if item)}
        results = merge(pathlib.Path(a.merge), codes, a.seconds)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench.gpu_check needs a CUDA device")
        results = run(a.model, a.prompts, a.max_tokens, a.batch_sizes)
    with open(a.json_path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k not in ("throughput", "machine")}, indent=2))
    return results


if __name__ == "__main__":
    main()
