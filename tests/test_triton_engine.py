"""The engine on the Triton attention backend and its CUDA-graph decoder, on a GPU where there is one, else on
CPU: the kernel in Triton's interpreter, the graphs through `EagerCapture` (the buffers, padding and buckets a
GPU replays). Greedy fp32 output equals transformers token for token; the selection refuses what cannot run,
saying what to do."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention.triton_backend import triton_installed
from engine.cuda_graphs import CudaGraphDecoder, EagerCapture, batch_buckets, bucket_for
from tests.support.hf_reference import hf_greedy
from tests.test_engine_vs_transformers import _check_tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_installed(), reason="needs Triton (scripts/setup.sh installs it)")
LENGTHS = (1, 3, 16, 17, 40, 90)


@needs_triton
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mistral_window_dir", "tiny_gemma2_dir"])
def test_greedy_output_equals_transformers_with_chunked_prefill_and_cached_prefixes(fixture, request) -> None:  # type: ignore[no-untyped-def]
    # windows (Mistral), soft-capped scores and alternating windows (Gemma 2); a 32-token budget chunks prompts
    llm = _check_tiny(str(request.getfixturevalue(fixture)), {"attention_backend": "triton", "device": DEVICE,
                                                              "max_num_batched_tokens": 32}, LENGTHS)
    assert llm.engine.runner.use_triton and not llm.engine.runner.use_cpu_kernel


@needs_triton
def test_an_fp8_cache_gives_the_torch_backends_tokens(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    """Nearly: the torch backend attends to a fresh prompt's own K/V before their fp8 rounding, the kernel to
    them as stored (test_triton_attention checks the kernel exactly against the stored values)."""
    prompts = [[(7 * i + j % (5 + i)) % 500 + 3 for j in range(n)] for i, n in enumerate(LENGTHS)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_dtype="fp8_e4m3", num_kv_blocks=64,
                  attention_backend=backend, device=DEVICE)
        outputs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    agree = [t == r for t, r in zip(outputs["triton"], outputs["torch"], strict=True)]
    assert sum(agree) >= len(agree) - 1, agree


@needs_triton
def test_graph_decoder_replays_every_bucket_and_equals_transformers(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, attention_backend="triton", max_num_seqs=5,
              device=DEVICE, enforce_eager=True)  # (the engine's own graphs off: these are the test's)
    runner = llm.engine.runner
    capture = EagerCapture()
    graphs = CudaGraphDecoder(runner.model, runner.pool, 5, llm.engine.max_model_len, capture)
    assert graphs.buckets == (1, 2, 4, 5) and len(capture.captured) == 4
    replayed = _count_replays(graphs)
    runner.graphs = graphs
    prompts = [[(7 * i + j % (5 + i)) % 500 + 3 for j in range(n)] for i, n in enumerate((*LENGTHS, 5, 33))]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for out, prompt in zip(outputs, prompts, strict=True):
        assert out.token_ids == hf_greedy(str(tiny_llama_dir), prompt, 12, eos_ids=())
    assert set(replayed) >= {4, 5}  # 8 prompts through 5 slots: full decode batches, then padded ones
    llm.engine.check_integrity()


def _count_replays(graphs: CudaGraphDecoder) -> list[int]:
    """The buckets `graphs` replays from now on, in order."""
    replayed: list[int] = []
    for bucket, replay in list(graphs.replays.items()):
        graphs.replays[bucket] = lambda replay=replay, bucket=bucket: (replayed.append(bucket), replay())[1]
    return replayed


def test_buckets_cover_every_batch_up_to_the_largest() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(5) == (1, 2, 4, 5)
    assert batch_buckets(256)[-3:] == (128, 192, 256)
    assert batch_buckets(300)[-2:] == (256, 300)
    buckets = batch_buckets(40)
    assert buckets == (1, 2, 4, 8, 16, 24, 32, 40)
    assert [bucket_for(n, buckets) for n in (1, 3, 9, 24, 25, 40)] == [1, 4, 16, 24, 32, 40]
    assert bucket_for(41, buckets) is None  # past the largest: eager
    with pytest.raises(ValueError, match="batch"):
        batch_buckets(0)


def test_auto_keeps_the_c_kernel_on_cpu(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    runner = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, device="cpu").engine.runner
    assert runner.use_cpu_kernel and not runner.use_triton and runner.graphs is None


@needs_triton
def test_triton_on_cpu_without_the_interpreter_is_refused(tiny_llama_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"runs on CUDA.*TRITON_INTERPRET=1"):
        LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, attention_backend="triton", device="cpu")


def test_triton_asked_for_but_not_installed_says_what_to_install(tiny_llama_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("engine.attention.triton_backend.triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"Triton is not installed.*setup\.sh --gpu"):
        LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=16, attention_backend="triton")


def test_the_removed_flash_backend_names_its_replacement(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="'triton' replaces it"):
        LLM(str(tiny_llama_dir), attention_backend="flash")


@needs_triton
def test_a_step_a_kv_push_observes_runs_eagerly_and_every_layer_is_seen(tiny_llama_dir) -> None:  # type: ignore[no-untyped-def]
    """With a layer observer (a KV push), decode steps leave the graphs: a replay would write every layer's KV with
    no moment for the push to see each one. Output unchanged."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, attention_backend="triton", max_num_seqs=4,
              device=DEVICE, enforce_eager=True)
    runner = llm.engine.runner
    graphs = CudaGraphDecoder(runner.model, runner.pool, 4, llm.engine.max_model_len, EagerCapture())
    replayed = _count_replays(graphs)
    runner.graphs = graphs
    seen: list[int] = []
    runner.layer_observer = lambda layer, ready: seen.append(layer)
    prompts = [[(7 * i + j % (5 + i)) % 500 + 3 for j in range(n)] for i, n in enumerate((3, 17, 40))]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for out, prompt in zip(outputs, prompts, strict=True):
        assert out.token_ids == hf_greedy(str(tiny_llama_dir), prompt, 6, eos_ids=())
    assert replayed == [] and seen and set(seen) == {0, 1} and len(seen) % 2 == 0
    runner.layer_observer = None
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert replayed  # (the same steps without an observer replay)
