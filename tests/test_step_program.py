"""Steps as one C call (engine/step_program.py) against the eager forward they replace.

The program calls the eager path's own kernels on the same inputs in the same order, so outputs must be
bit for bit equal: greedy tokens and every logprob, alone and beside other sequences (batches run eagerly).
In fp32 it also runs speculative verify steps of a few tokens (tests/test_spec_draft.py checks their tokens).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention.metadata import AttentionMetadata
from engine.attention.planning import SeqSpan, attention_metadata
from engine.loader.packing import onednn_packs
from engine.step_program import MAX_ROWS

PROMPTS = [[3, 17, 99, 5, 41], [3, 250, 7, 7, 7, 7, 61, 12, 90, 33, 1, 8]]


def has_one_row_kernels(kwargs: dict) -> bool:  # type: ignore[type-arg]
    """Whether every linear of an engine made with `kwargs` has a one-row C kernel on this CPU: quantized
    ones always, plain bf16 ones only where oneDNN packs bf16 (not on an AVX2-only CPU: those stay torch's
    own linears, and one-token steps run eagerly)."""
    return kwargs.get("dtype") != "bfloat16" or "quantization" in kwargs or onednn_packs(torch.bfloat16)


Run = tuple[list[list[int]], list[list[float]]]


def _run(path: pathlib.Path, eager: bool, **kwargs: object) -> tuple[Run, Run, int]:
    """Greedy tokens and their top-3 logprobs of each prompt alone, then of the prompts together, and how
    many steps the program ran."""
    llm = LLM(str(path), num_kv_blocks=64, enforce_eager=eager, **kwargs)  # type: ignore[arg-type]
    program = llm.engine.runner.program
    assert (program is not None) == (not eager and has_one_row_kernels(kwargs)), \
        "the program is built unless the engine is eager or a linear has no one-row C kernel here"
    runs = [0]
    if program is not None:
        run = program.run

        def counted(*args: torch.Tensor) -> torch.Tensor:
            runs[0] += 1
            return run(*args)

        program.run = counted  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    alone = [o for prompt in PROMPTS for o in llm.generate([prompt], params)]
    together = llm.generate(PROMPTS, params)
    llm.engine.check_integrity()

    def found(outs: list) -> Run:  # type: ignore[type-arg]
        return ([o.token_ids for o in outs], [[lp for step in o.logprobs or [] if step is not None
                                               for lp in (step.logprob, *(p for _, p in step.top))] for o in outs])
    return found(alone), found(together), runs[0]


@pytest.mark.parametrize(("fixture", "kwargs"), [
    ("tiny_llama_dir", {"dtype": "float32"}),
    ("tiny_llama_dir", {"dtype": "bfloat16"}),
    ("tiny_llama_dir", {"dtype": "float32", "quantization": "int4"}),
    ("tiny_llama_dir", {"dtype": "bfloat16", "quantization": "int8"}),
    ("tiny_qwen2_dir", {"dtype": "float32"}),  # q/k/v biases through the one-row kernel
    ("tiny_mistral_window_dir", {"dtype": "bfloat16"}),  # a sliding window per layer
])
def test_program_steps_equal_eager_steps(request: pytest.FixtureRequest, fixture: str, kwargs: dict) -> None:
    path = request.getfixturevalue(fixture)
    eager_alone, eager_together, _ = _run(path, eager=True, **kwargs)
    alone, together, runs = _run(path, eager=False, **kwargs)
    if has_one_row_kernels(kwargs):
        assert runs >= 2 * 11, "the one-token steps of the lone prompts went through the program"
    assert alone == eager_alone  # exact floats: the same kernels in the same order
    assert together == eager_together


def test_families_with_other_layers_step_eagerly(tiny_qwen3_dir: pathlib.Path) -> None:
    llm = LLM(str(tiny_qwen3_dir), num_kv_blocks=64)  # q/k norms: no C kernel in the program for them
    assert llm.engine.runner.program is None
    assert llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids


def test_which_steps_run_through_the_program(tiny_llama_dir: pathlib.Path) -> None:
    def meta(*spans: SeqSpan) -> AttentionMetadata:
        return attention_metadata(list(spans), 16, torch.device("cpu"), torch.float32, True, 64)

    fp32 = LLM(str(tiny_llama_dir), num_kv_blocks=64, dtype="float32").engine.runner.program
    assert fp32 is not None and fp32.max_rows == MAX_ROWS[torch.float32] > 1
    assert fp32.can_run(meta(SeqSpan([0, 1], 20, 1)))  # a decode
    assert fp32.can_run(meta(SeqSpan([0], 0, 1)))  # a one-token prompt
    assert fp32.can_run(meta(SeqSpan([0, 1], 20, 1), SeqSpan([2], 3, 1)))  # two sequences
    assert fp32.can_run(meta(SeqSpan([0, 1], 18, 3)))  # a draft verified
    assert not fp32.can_run(meta(SeqSpan([0, 1], 18, fp32.max_rows + 1)))  # a prompt chunk
    assert not fp32.can_run(meta(SeqSpan([0, 1, 2, 3, 4], 0, 70)))  # torch's flash path for long prompts
    if onednn_packs(torch.bfloat16):
        bf16 = LLM(str(tiny_llama_dir), num_kv_blocks=64, dtype="bfloat16").engine.runner.program
        assert bf16 is not None and bf16.max_rows == 1
        assert not bf16.can_run(meta(SeqSpan([0, 1], 20, 1), SeqSpan([2], 3, 1)))


def test_a_program_step_of_several_rows_computes_each_row_as_alone(tiny_llama_dir: pathlib.Path) -> None:
    """Two decodes and a 3-token verify in one fp32 program step: hidden states bit for bit those of one-row
    steps (gemv.c's few-row kernel is its one-row kernel's twin), and close to the eager forward's."""
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, dtype="float32")
    runner, program = llm.engine.runner, llm.engine.runner.program
    assert program is not None
    prompt = [3, 17, 99, 5, 41, 250, 7, 61]
    runner.logits_at_ends(prompt, [SeqSpan([0], 0, 8)])  # the prompt's KV in block 0, eagerly (8 rows)
    runner.logits_at_ends(prompt, [SeqSpan([1], 0, 8)])  # ... and in block 1

    def hidden(tokens: list[int], spans: list[SeqSpan], eager: bool = False) -> torch.Tensor:
        meta = attention_metadata(spans, 16, torch.device("cpu"), torch.float32, True)
        ids = torch.tensor(tokens)
        positions = torch.tensor([p for s in spans for p in range(s.start, s.context_len)])
        assert program.can_run(meta)
        if eager:
            return runner.model(ids, positions, runner._attention(meta))
        return program.run(ids, positions, meta)

    spans = [SeqSpan([0], 8, 1), SeqSpan([1], 8, 1), SeqSpan([2, 3], 20, 3)]
    together = hidden([12, 90, 33, 1, 8], spans)
    assert torch.equal(together[0], hidden([12], spans[:1])[0])
    assert torch.equal(together[1], hidden([90], spans[1:2])[0])
    torch.testing.assert_close(together, hidden([12, 90, 33, 1, 8], spans, eager=True), atol=1e-4, rtol=0)
