"""The throughput benchmark, run in-process on a tiny model: its JSON is complete and self-consistent."""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterator

import pytest
import torch

from bench.throughput import EngineBench, PromptSource, greedy_agreement, main
from engine import LLM

BATCHES = (1, 2)
MAX_TOKENS = 8
TINY = ["--batch-sizes", *map(str, BATCHES), "--prompt-len", "16", "--max-tokens", str(MAX_TOKENS),
        "--prefill-len", "32", "--prefill-prompts", "2", "--profile-batch", "2", "--num-threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # --num-threads sets torch's process-wide thread count
    yield
    torch.set_num_threads(threads)


def _run(model_dir: pathlib.Path, tmp_path: pathlib.Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    returned = main([*TINY, "--model", str(model_dir), "--json", str(out), *extra])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def _check_decode(runs: list[dict], engine: bool) -> None:
    assert [r["batch_size"] for r in runs] == list(BATCHES)
    for r in runs:
        assert r["output_tokens"] == r["batch_size"] * MAX_TOKENS
        assert r["prefill_s"] > 0 and r["total_s"] > r["prefill_s"]
        assert r["decode_tok_s"] > 0
        assert math.isclose(r["overall_tok_s"], r["output_tokens"] / r["total_s"], rel_tol=1e-9)
        if engine:
            assert r["cached_prompt_tokens"] == 0
            assert r["prefill_phase_tokens"] >= r["batch_size"]
            assert r["prefill_phase_tokens"] + r["decode_tokens"] == r["output_tokens"]
            assert math.isclose(r["prefill_s"] + r["decode_s"], r["total_s"], rel_tol=1e-9)
            assert r["decode_steps"] == MAX_TOKENS - 1  # these prompts prefill in one step


def _check_engine(result: dict) -> None:
    machine = result["machine"]
    assert machine["torch_threads"] == 1 and machine["usable_cores"] >= 1
    assert machine["cpu_model"] and machine["torch_version"] == torch.__version__ and machine["date"]
    eng = result["engine"]
    assert eng["dtype"] in ("float32", "bfloat16", "float16")
    _check_decode(eng["decode"], engine=True)
    pre = eng["prefill"]
    assert (pre["num_prompts"], pre["prompt_len"]) == (2, 32)
    assert math.isclose(pre["tok_s"], 64 / pre["seconds"], rel_tol=1e-9)
    assert len(pre["runs_s"]) == 3 and sorted(pre["runs_s"])[1] == pre["seconds"]  # the median run
    prof = eng["step_profile"]
    assert prof["batch_size"] == 2 and prof["decode_steps"] == MAX_TOKENS - 1
    assert 0 < prof["forward_ms"] <= prof["step_ms"]
    shares = [prof[k] for k in ("forward_share", "outside_share", "schedule_share", "prepare_share",
                                "sample_share", "other_share")]
    assert all(0 <= s <= 1 for s in shares)
    assert math.isclose(prof["forward_share"] + prof["outside_share"], 1.0)
    parts = prof["schedule_share"] + prof["prepare_share"] + prof["sample_share"] + prof["other_share"]
    assert math.isclose(parts, prof["outside_share"], abs_tol=1e-9)
    assert prof["schedule_share"] > 0 and prof["prepare_share"] > 0 and prof["sample_share"] > 0
    pipelined = eng["async_step_profile"]
    assert pipelined["batch_size"] == 2 and pipelined["decode_steps"] >= MAX_TOKENS - 2
    assert pipelined["forward_ms"] > 0 and pipelined["overlapped_ms"] > 0 and pipelined["waiting_ms"] > 0
    assert pipelined["serial_ms"] > 0 and pipelined["exposed_share"] < 1


def test_engine_only(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    result = _run(tiny_llama_dir, tmp_path, "--skip-hf")
    _check_engine(result)
    assert result["hf"] is None and result["agreement"] is None


def test_with_transformers_baseline(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    result = _run(tiny_llama_dir, tmp_path, "--hf-batch-sizes", *map(str, BATCHES))
    _check_engine(result)
    hf = result["hf"]
    assert hf["dtype"] == result["engine"]["dtype"]
    _check_decode(hf["decode"], engine=False)
    assert (hf["prefill"]["num_prompts"], hf["prefill"]["prompt_len"]) == (2, 32)
    assert hf["prefill"]["tok_s"] > 0
    assert len(hf["prefill"]["runs_s"]) == 3 and sorted(hf["prefill"]["runs_s"])[1] == hf["prefill"]["seconds"]


def test_quantized_reports_agreement(tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    result = _run(tiny_llama_dir, tmp_path, "--skip-hf", "--quantization", "int8", "--agreement-tokens", "8")
    _check_engine(result)
    assert result["engine"]["quantization"] == "int8" and result["engine"]["quantized_layers"] > 0
    agreement = result["agreement"]
    assert (agreement["prompts"], agreement["tokens_per_prompt"]) == (8, 8)
    assert 0 <= agreement["prefix_agreement"] <= agreement["token_agreement"] <= 1


def test_profiler_restores_the_engine(tiny_llama_dir: pathlib.Path) -> None:
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=16, num_threads=1)
    engine = llm.engine
    sampler, model = engine.runner.sampler, engine.parts.model
    bench = EngineBench(llm)
    profile = bench.profile(PromptSource(engine.model_config.vocab_size, 0).take(2, 8), 4)
    assert profile.decode_steps == 3
    assert engine.runner.sampler is sampler
    for owner, name in ((model, "forward"), (model, "sampling_logits"), (engine.runner, "prepare"),
                        (engine.scheduler, "schedule")):
        assert name not in vars(owner)
    engine.check_integrity()


def test_prompts_never_repeat_and_avoid_special_ids() -> None:
    source = PromptSource(vocab_size=50, seed=3)
    batches = [source.take(4, 16) for _ in range(3)]
    rows = [tuple(row) for batch in batches for row in batch]
    assert len(set(rows)) == len(rows)
    assert all(10 <= t < 50 for row in rows for t in row)
    assert PromptSource(50, 3).take(4, 16) == batches[0]  # seeded: the same stream each invocation


def test_greedy_agreement_counts_positions_and_prefixes() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    quantized = [[1, 2, 9, 4], [5, 6, 7, 8]]
    assert greedy_agreement(quantized, reference) == {
        "prompts": 2, "tokens_per_prompt": 4, "token_agreement": 7 / 8, "prefix_agreement": (2 / 4 + 1) / 2}


def test_moe_layer_bench(tiny_mixtral_dir: pathlib.Path, tmp_path: pathlib.Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.moe_layer checks its layer against transformers' block, then times it and its parts."""
    from bench import moe_layer

    out = tmp_path / "moe.json"
    monkeypatch.setattr("sys.argv", ["moe_layer", str(tiny_mixtral_dir), "--batch-sizes", "1", "4",
                                     "--repeats", "2", "--json", str(out)])
    moe_layer.main()
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert 1 <= row["experts_used"] <= 4
        assert all(row[k] > 0 for k in ("engine_ms", "routing_ms", "dispatch_ms", "experts_ms", "transformers_ms"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_row_linears_bench(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """bench.one_row_linears times the C kernel, oneDNN and MKL (here over two small shapes), and puts
    each path back as it found it between runs; where oneDNN cannot pack the dtype it says so."""
    from bench import one_row_linears
    from engine.loader.packing import onednn_packs

    out = tmp_path / "rows.json"
    monkeypatch.setattr(one_row_linears, "SHAPES", [(96, 64), (40, 96)])
    monkeypatch.setattr("sys.argv", ["one_row_linears", "--dtype", dtype, "--json", str(out)])
    if not onednn_packs(getattr(torch, dtype)):
        with pytest.raises(SystemExit, match="cannot pack"):
            one_row_linears.main()
        return
    one_row_linears.main()
    result = json.loads(out.read_text())
    assert result["dtype"] == dtype
    assert result["weight_bytes"] == sum(n * k for n, k in one_row_linears.SHAPES) * (4 if dtype == "float32" else 2)
    assert all(result[k] > 0 for k in ("c_gemv_ms", "onednn_ms", "mkl_mm_ms", "c_gb_s", "read_gb_s"))


@pytest.mark.parametrize(("family", "layers"), [("mistral", 1), ("gemma3", 6)])
def test_window_kv_bench(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, family: str, layers: int) -> None:
    """bench.window_kv runs both modes on its own windowed checkpoint (every layer windowed, or a hybrid Gemma 3)
    and finds the give-back mode holds fewer bytes of the same pool."""
    from bench import window_kv

    out = tmp_path / "window.json"
    monkeypatch.setattr("sys.argv", ["window_kv", "--family", family, "--layers", str(layers), "--window", "16",
                                     "--requests", "2", "--prompt", "96", "--max-tokens", "8", "--pool-blocks", "32",
                                     "--out", str(out)])
    window_kv.main()
    result = json.loads(out.read_text())
    kept, given = result["keep_every_block"], result["give_back_behind_window"]
    assert given["peak_bytes_held"] < kept["peak_bytes_held"] and given["blocks_given_back"] > 0
    assert given["pool_bytes"] == kept["pool_bytes"]
    assert kept["generated_tokens"] == given["generated_tokens"] == 16


def test_prefill_attention_bench_times_every_path() -> None:
    """bench.prefill_attention times the paged kernel, torch's flash kernel and (where AMX is granted) the
    tiles on one small step."""
    from bench.prefill_attention import measure
    from engine.kernels import flash_prefill_kernel

    lib = flash_prefill_kernel()
    assert lib is not None
    result = measure(2, 40, 24, repeats=1)
    assert result["paged_c_ms"] is not None and result["paged_c_ms"] > 0
    assert result["torch_flash_ms"] is not None and result["torch_flash_ms"] > 0
    tiles = result["amx_tiles_ms"]
    assert (tiles is not None and tiles > 0) if lib.flash_prefill_uses_amx() == 1 else tiles is None


@pytest.mark.slow
def test_tp_kv_push_bench_counts_bytes_per_link(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.tp_kv_push runs equal and mixed degrees: every prefill is remote, and two prefill ranks into one
    decode rank carry half the single rank's bytes each."""
    from bench import tp_kv_push

    out = tmp_path / "tp.json"
    monkeypatch.setattr("sys.argv", ["tp_kv_push", "--configs", "1:1,2:1", "--prompts", "2", "--prompt-tokens", "64",
                                     "--layers", "2", "--out", str(out)])
    tp_kv_push.main()
    one, two = json.loads(out.read_text())["results"]
    assert one["remote_prefills"] == two["remote_prefills"] == 2
    assert two["bytes_per_prefill_by_link"] == {"0->0": one["bytes_per_prefill"] / 2,
                                                 "1->0": one["bytes_per_prefill"] / 2}


def test_tp_threads_bench_times_each_engine_with_its_threads(tmp_path: pathlib.Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.tp_threads runs one rank, two ranks of every core and two of their share (Gloo, then shared memory), and
    times both passes."""
    from bench import tp_threads

    out = tmp_path / "threads.json"
    monkeypatch.setattr("sys.argv", ["tp_threads", "--prompts", "2", "--prompt-tokens", "32", "--new-tokens", "4",
                                     "--layers", "2", "--out", str(out)])
    tp_threads.main()
    results = json.loads(out.read_text())["results"]
    cores = len(os.sched_getaffinity(0))
    assert [(r["tensor_parallel_size"], r["threads_per_rank"], r["shared_memory"]) for r in results] == \
        [(1, cores, False), (2, cores, False), (2, max(1, cores // 2), False), (2, max(1, cores // 2), True)]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in results)
